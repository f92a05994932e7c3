//! The house rules, read from the source: the library's layers point one way, the
//! library never prints and knows nothing of clap, and `nn` does no I/O. A new
//! `use crate::…` against the order fails here, naming the file and the arrow.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module of the library and its floor (docs/ARCHITECTURE.md). A file
/// may name another module only if that module stands on a lower floor.
const FLOORS: &[(&str, u32)] = &[
    // The ground: pure networks, tensor preprocessing and small tools.
    ("nn", 0),
    ("preprocess", 0),
    ("util", 0),
    ("backend", 0),
    ("http", 0),
    ("health", 0),
    // Weights: where they live, how they load.
    ("model", 1),
    // Inference: the classifier, labels and decisions, the Captioner trait.
    ("infer", 2),
    // What is built on inference.
    ("caption", 3),
    ("train", 3),
    ("bench", 3),
    // The appliance, from its config up to its wiring.
    ("config", 4),
    ("pipeline", 5),
    ("source", 6),
    ("publish", 6),
    ("status", 7),
    ("appliance", 8),
];

/// The binary's files: they sit above the library and use it by name (`marquee::`).
fn is_binary(rel: &Path) -> bool {
    rel == Path::new("main.rs") || rel.starts_with("cli")
}

fn library_files() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| p.strip_prefix(&src).unwrap().to_path_buf())
        .filter(|rel| !is_binary(rel) && rel != Path::new("lib.rs"))
        .map(|rel| {
            let text = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(&rel),
            )
            .unwrap();
            (rel, text)
        })
        .collect()
}

/// The code of a file without its comments (a module doc may name other layers).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let code = l.split("//").next().unwrap_or("");
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::NAME` a line names (in `use` lines and inline paths alike).
fn crate_refs(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn imports_point_down_the_floors_only() {
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let mut wrong = Vec::new();
    let files = library_files();
    assert!(files.len() > 40, "read only {} library files", files.len());
    for (rel, text) in &files {
        let from = top_module(rel);
        let Some(&here) = floors.get(from.as_str()) else {
            wrong.push(format!(
                "{}: module `{from}` has no floor in FLOORS",
                rel.display()
            ));
            continue;
        };
        for (line, code) in code_lines(text) {
            for to in crate_refs(code) {
                if to == from {
                    continue;
                }
                match floors.get(to.as_str()) {
                    None => wrong.push(format!("{}:{line}: `crate::{to}` has no floor", rel.display())),
                    Some(&there) if there >= here => wrong.push(format!(
                        "{}:{line}: {from} (floor {here}) -> {to} (floor {there}) runs up or sideways",
                        rel.display()
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_library_never_prints_and_has_no_cli() {
    let mut wrong = Vec::new();
    for (rel, text) in library_files() {
        for (line, code) in code_lines(&text) {
            for bad in [
                "println!",
                "eprintln!",
                "print!",
                "eprint!",
                "dbg!",
                "indicatif",
                "clap::",
            ] {
                if code.contains(bad) {
                    wrong.push(format!("{}:{line}: {bad}", rel.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the library prints or parses flags:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn nn_does_no_io() {
    let mut wrong = Vec::new();
    for (rel, text) in library_files() {
        if top_module(&rel) != "nn" {
            continue;
        }
        for (line, code) in code_lines(&text) {
            for bad in [
                "std::fs",
                "std::net",
                "std::io",
                "File::",
                "std::env",
                "std::process",
            ] {
                if code.contains(bad) {
                    wrong.push(format!("{}:{line}: {bad}", rel.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "I/O in nn/:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_an_arrow_against_the_layers() {
    // The rule has teeth: a line like the old classify -> train import is found.
    assert_eq!(crate_refs("use crate::train::metrics::decide;"), ["train"]);
    assert_eq!(
        crate_refs("let x = crate::util::hex(&b); // crate::nn"),
        ["util", "nn"]
    );
    assert!(crate_refs("use marquee::train;").is_empty());
    let code: Vec<_> = code_lines("//! crate::train\nuse crate::nn::x; // crate::train").collect();
    assert_eq!(code.len(), 1);
    assert_eq!(crate_refs(code[0].1), ["nn"]);
}
