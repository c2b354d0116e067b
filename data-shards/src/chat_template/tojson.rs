//! The `tojson` filter of `transformers`' chat templates: Python's `json.dumps` (no HTML escaping), not minijinja's.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// How `json.dumps` was asked to write.
struct Style {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// `value | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)` as `transformers` defines
/// it (the first two also positionally).
pub fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let arg = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        Ok(match positional {
            Some(v) => Some(v),
            None => kwargs.get::<Option<Value>>(name)?,
        })
    };
    let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => Some(" ".repeat(v.as_usize().ok_or_else(|| invalid("indent must be a count or a string"))?)),
    };
    let (mut item_separator, mut key_separator) =
        if indent.is_some() { (",".to_string(), ": ".to_string()) } else { (", ".to_string(), ": ".to_string()) };
    if let Some(v) = kwargs.get::<Option<Value>>("separators")?.filter(|v| !v.is_none() && !v.is_undefined()) {
        let parts: Vec<Value> = v.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                item_separator = item.as_str().unwrap_or_default().to_string();
                key_separator = key.as_str().unwrap_or_default().to_string();
            }
            _ => return Err(invalid("separators must be a pair of strings")),
        }
    }
    let sort_keys = kwargs.get::<Option<Value>>("sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = Style { ensure_ascii, indent, item_separator, key_separator, sort_keys };
    let mut out = String::new();
    write_value(&mut out, value, &style, 0)?;
    Ok(out)
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {message}"))
}

fn write_value(out: &mut String, value: &Value, style: &Style, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            let items = keys
                .into_iter()
                .map(|k| {
                    let v = value.get_item(&k)?;
                    Ok((k, v))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            write_container(out, ('{', '}'), items.len(), style, depth, |out, i| {
                let (k, v) = &items[i];
                match k.as_str() {
                    Some(s) => write_string(out, s, style.ensure_ascii),
                    None => write_string(out, &k.to_string(), style.ensure_ascii),
                }
                out.push_str(&style.key_separator);
                write_value(out, v, style, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), items.len(), style, depth, |out, i| {
                write_value(out, &items[i], style, depth + 1)
            })?;
        }
        other => return Err(invalid(&format!("cannot write a {other} as JSON"))),
    }
    Ok(())
}

/// `[`/`{`, the items (by index) with separators and indentation, `]`/`}`; empty containers as `[]`/`{}`.
fn write_container(
    out: &mut String,
    (open, close): (char, char),
    len: usize,
    style: &Style,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len > 0 {
        for i in 0..len {
            if i > 0 {
                out.push_str(&style.item_separator);
            }
            if let Some(indent) = &style.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            item(out, i)?;
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python writes it: `"`, `\` and control characters escaped (serde_json escapes the same set,
/// in the same lowercase form), with `ensure_ascii` everything past ASCII as `\uXXXX` (surrogate pairs).
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    let quoted = serde_json::to_string(s).expect("a string serializes");
    if !ensure_ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}
