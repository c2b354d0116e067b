//! The trainer's modules form layers: each uses only modules of lower layers (so no cycles), as the table in docs/ARCHITECTURE.md says.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The layers table of docs/ARCHITECTURE.md: rows `| N | `a`, `b` | what |`, module -> layer.
fn documented_layers() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("../docs/ARCHITECTURE.md")).unwrap();
    let section = text.split("<!-- layers -->").nth(1).expect("docs/ARCHITECTURE.md has a <!-- layers --> table");
    let mut layers = BTreeMap::new();
    for row in section.lines().take_while(|line| !line.contains("<!-- /layers -->")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(layer) = cells.get(1).and_then(|cell| cell.parse::<usize>().ok()) else { continue };
        for module in cells[2].split(',') {
            let module = module.trim().trim_matches('`');
            assert!(layers.insert(module.to_string(), layer).is_none(), "{module} is in two layers");
        }
    }
    layers
}

/// The crate's top-level modules (files and directories of src/, not the binaries) with their files.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let src = Path::new(ROOT).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if ["main", "lib", "bin"].contains(&name.as_str()) {
            continue;
        }
        let files = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect()
        } else {
            vec![path]
        };
        modules.insert(name, files);
    }
    modules
}

/// The top-level modules a source text names through `crate::a` or `crate::{a, b::c}`.
fn used_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (start, _) in text.match_indices("crate::") {
        if text[..start].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `data_shards::` or `other_crate::`
        }
        let rest = &text[start + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at depth 1 of the brace group: after `{` and after each `,`.
            let (mut depth, mut expecting) = (1, true);
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expecting = true,
                    c if expecting && depth == 1 && (c.is_alphanumeric() || c == '_') => name.push(c),
                    _ if !name.is_empty() => {
                        used.insert(std::mem::take(&mut name));
                        expecting = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
            if !name.is_empty() {
                used.insert(name);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            used.insert(name);
        }
    }
    used
}

#[test]
fn every_module_uses_only_modules_of_lower_layers() {
    let layers = documented_layers();
    let modules = modules();
    let listed: BTreeSet<&String> = layers.keys().collect();
    let present: BTreeSet<&String> = modules.keys().collect();
    assert_eq!(
        listed, present,
        "the layers table of docs/ARCHITECTURE.md must list exactly the modules of trainer/src"
    );
    let mut upward = Vec::new();
    for (module, files) in &modules {
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            // Comments may name any module (doc links); only code makes a dependency.
            let code: String = text.lines().map(|line| line.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
            for used in used_modules(&code) {
                if used == *module || !layers.contains_key(&used) {
                    continue;
                }
                if layers[&used] >= layers[module] {
                    upward.push(format!(
                        "{} (layer {}) uses {used} (layer {})",
                        file.strip_prefix(ROOT).unwrap().display(),
                        layers[module],
                        layers[&used]
                    ));
                }
            }
        }
    }
    assert!(upward.is_empty(), "modules may use only lower layers:\n{}", upward.join("\n"));
}

#[test]
fn the_reader_of_uses_finds_plain_paths_and_groups() {
    let text = "use crate::config::{Config, Dtype};\nuse crate::{comm::{Comm, GroupKind}, model};\nlet x = crate::plan::plan(); data_shards::x;";
    let found: Vec<String> = used_modules(text).into_iter().collect();
    assert_eq!(found, ["comm", "config", "model", "plan"]);
}
