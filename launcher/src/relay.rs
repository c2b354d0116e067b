//! Relay of mpirun's output: every rank's lines re-printed with a `[rank R] ` prefix on the launcher's stdout or stderr.
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Child;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The threads relaying mpirun's stdout and stderr.
pub struct Relays {
    done: mpsc::Receiver<()>,
    running: usize,
}

impl Relays {
    /// Takes `mpirun`'s piped stdout and stderr and relays each on a thread of its own.
    pub fn start(mpirun: &mut Child) -> Relays {
        let (done_tx, done) = mpsc::channel();
        let mut running = 0;
        if let Some(out) = mpirun.stdout.take() {
            spawn_relay(out, done_tx.clone());
            running += 1;
        }
        if let Some(err) = mpirun.stderr.take() {
            spawn_relay(err, done_tx);
            running += 1;
        }
        Relays { done, running }
    }

    /// Waits until every relayed pipe has reached its end, for at most `timeout`; false if one is still open then.
    pub fn finish(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        (0..self.running).all(|_| self.done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok())
    }
}

/// Relays one of mpirun's output pipes on a thread; sends on `done` at end of file.
fn spawn_relay(pipe: impl Read + Send + 'static, done: mpsc::Sender<()>) {
    thread::spawn(move || {
        relay(BufReader::new(pipe));
        let _ = done.send(());
    });
}

/// Re-prints each line read from mpirun with its rank prefix, on the launcher's stdout or stderr.
fn relay(mut input: impl BufRead) {
    let mut line = Vec::new();
    // After a write error (e.g. the reader of our stdout went away) keep draining mpirun's pipe, so it never blocks.
    let (mut stdout_ok, mut stderr_ok) = (true, true);
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        for (stream, out) in format_line(text) {
            match stream {
                Stream::Stdout if stdout_ok => stdout_ok = std::io::stdout().lock().write_all(&out).is_ok(),
                Stream::Stderr if stderr_ok => stderr_ok = std::io::stderr().lock().write_all(&out).is_ok(),
                _ => {}
            }
        }
    }
}

/// Which of the launcher's streams a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// The launcher's output for one line of mpirun output (without its newline), each piece ending in a newline.
///
/// `--tag-output` lines look like `[JOBID,RANK]<stdout>:text` (or `<stderr>:`, `<stddiag>:`). mpirun does not
/// end a rank's last line if the rank did not, so another tag can follow mid-line; each tag starts a new piece.
/// Untagged lines are mpirun's own messages and go to stderr as they are.
fn format_line(line: &[u8]) -> Vec<(Stream, Vec<u8>)> {
    let Some((mut tag, mut start)) = parse_tag(line) else {
        let mut out = line.to_vec();
        out.push(b'\n');
        return vec![(Stream::Stderr, out)];
    };
    let mut pieces = Vec::new();
    loop {
        let next = (start..line.len())
            .filter(|&i| line[i] == b'[')
            .find_map(|i| parse_tag(&line[i..]).map(|(tag, len)| (i, tag, len)));
        let end = next.map_or(line.len(), |(i, _, _)| i);
        let mut out = format!("[rank {}] ", tag.rank).into_bytes();
        out.extend_from_slice(&line[start..end]);
        out.push(b'\n');
        pieces.push((tag.stream, out));
        match next {
            Some((i, next_tag, len)) => (tag, start) = (next_tag, i + len),
            None => return pieces,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    rank: u32,
    stream: Stream,
}

/// Parses a `[JOBID,RANK]<stdout>:` tag at the start of `s`; returns it and its length.
fn parse_tag(s: &[u8]) -> Option<(Tag, usize)> {
    let rest = s.strip_prefix(b"[")?;
    let jobid_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = rest[jobid_len..].strip_prefix(b",").filter(|_| jobid_len > 0)?;
    let rank_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rank = std::str::from_utf8(&rest[..rank_len]).ok()?.parse().ok()?;
    let rest = rest[rank_len..].strip_prefix(b"]")?;
    let (stream, name_len) =
        [(Stream::Stdout, &b"<stdout>:"[..]), (Stream::Stderr, b"<stderr>:"), (Stream::Stderr, b"<stddiag>:")]
            .into_iter()
            .find(|(_, name)| rest.starts_with(name))
            .map(|(stream, name)| (stream, name.len()))?;
    Some((Tag { rank, stream }, s.len() - rest.len() + name_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(pieces: Vec<(Stream, Vec<u8>)>) -> Vec<(Stream, String)> {
        pieces.into_iter().map(|(stream, out)| (stream, String::from_utf8(out).unwrap())).collect()
    }

    #[test]
    fn tagged_lines_get_rank_prefix_and_stream() {
        assert_eq!(text(format_line(b"[1,0]<stdout>:hello")), [(Stream::Stdout, "[rank 0] hello\n".into())]);
        assert_eq!(text(format_line(b"[12,17]<stderr>:oops: x")), [(Stream::Stderr, "[rank 17] oops: x\n".into())]);
        assert_eq!(text(format_line(b"[1,2]<stddiag>:diag")), [(Stream::Stderr, "[rank 2] diag\n".into())]);
        assert_eq!(text(format_line(b"[1,3]<stdout>:")), [(Stream::Stdout, "[rank 3] \n".into())]);
    }

    #[test]
    fn untagged_lines_pass_through_to_stderr() {
        for line in ["-----", "[1,x]<stdout>:no", "[,1]<stdout>:no", "[1,1]<stdin>:no", "mpirun noticed that"] {
            assert_eq!(text(format_line(line.as_bytes())), [(Stream::Stderr, format!("{line}\n"))]);
        }
    }

    #[test]
    fn unterminated_rank_output_followed_by_another_tag_is_split() {
        assert_eq!(
            text(format_line(b"[1,0]<stdout>:no newline[1,1]<stderr>:next [x]")),
            [(Stream::Stdout, "[rank 0] no newline\n".into()), (Stream::Stderr, "[rank 1] next [x]\n".into())]
        );
    }
}
