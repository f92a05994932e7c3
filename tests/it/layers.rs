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

/// A library file: where it is under src/, the module it is, and its text.
struct Source {
    rel: PathBuf,
    module: Vec<String>,
    text: String,
}

impl Source {
    fn new(rel: &str, text: &str) -> Self {
        let rel = PathBuf::from(rel);
        let mut module: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        Self {
            rel,
            module,
            text: text.to_string(),
        }
    }
}

fn library_files() -> Vec<Source> {
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
            let text = std::fs::read_to_string(src.join(&rel)).unwrap();
            Source::new(rel.to_str().unwrap(), &text)
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

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths of a `use` tree, braces expanded: `a::{b, c::{d, self}}` gives `a::b`,
/// `a::c::d` and `a::c`. Aliases and globs end a path.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &[char], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        loop {
            while *i < s.len() && s[*i].is_whitespace() {
                *i += 1;
            }
            if *i >= s.len() {
                break;
            }
            if s[*i] == '{' {
                *i += 1;
                loop {
                    parse(s, i, &path, out);
                    while *i < s.len() && s[*i].is_whitespace() {
                        *i += 1;
                    }
                    match s.get(*i) {
                        Some(',') => *i += 1,
                        Some('}') => {
                            *i += 1;
                            return;
                        }
                        _ => return,
                    }
                    while *i < s.len() && s[*i].is_whitespace() {
                        *i += 1;
                    }
                    if s.get(*i) == Some(&'}') {
                        *i += 1;
                        return;
                    }
                }
            }
            let start = *i;
            while *i < s.len() && (is_ident(s[*i]) || s[*i] == '*') {
                *i += 1;
            }
            let seg: String = s[start..*i].iter().collect();
            match seg.as_str() {
                "" | "*" => {}
                "self" if !path.is_empty() && !prefix.is_empty() && path.len() == prefix.len() => {}
                _ => path.push(seg),
            }
            if s.get(*i) == Some(&':') && s.get(*i + 1) == Some(&':') {
                *i += 2;
                continue;
            }
            // `as alias`: skip to the end of this item.
            while *i < s.len() && s[*i] != ',' && s[*i] != '}' {
                *i += 1;
            }
            break;
        }
        if path.len() > prefix.len() || (path == prefix && !path.is_empty()) {
            out.push(path);
        }
    }
    let chars: Vec<char> = tree.chars().collect();
    let mut out = Vec::new();
    parse(&chars, &mut 0, &[], &mut out);
    out
}

/// A module path that a line of a file names.
struct Reference {
    line: usize,
    /// From the crate root.
    path: Vec<String>,
    /// A `pub use`: the file's public face, not something its code depends on.
    reexport: bool,
}

/// Every module path a file's code names, from the crate root, with its line:
/// `use` trees (grouped or not), and inline `crate::`, `super::`, `self::` and
/// child-module paths. Paths into other crates are left out.
fn references(file: &Source) -> Vec<Reference> {
    let children: Vec<String> = code_lines(&file.text)
        .filter_map(|(_, code)| {
            let t = code.trim();
            let t = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub(super) "))
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            let name = t.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect();
    // Inside an inline module (`mod tests { ... }`), `super` is the file itself.
    let resolve = |module: &[String], path: &[String]| -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut base: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "self" => module.to_vec(),
            "super" => module[..module.len().saturating_sub(1)].to_vec(),
            name if children.iter().any(|c| c == name) => {
                let mut m = file.module.clone();
                m.push(name.to_string());
                m
            }
            _ => return None,
        };
        let mut rest = rest;
        // `super::super::x`
        while let Some((s, more)) = rest.split_first() {
            if s != "super" {
                break;
            }
            base.pop();
            rest = more;
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    let mut out = Vec::new();
    let lines: Vec<(usize, &str)> = code_lines(&file.text).collect();
    let mut module = file.module.clone();
    let mut k = 0;
    while k < lines.len() {
        let (line, code) = lines[k];
        let t = code.trim_start();
        if let Some(name) = t.strip_prefix("mod ").and_then(|r| r.strip_suffix('{')) {
            module = [&file.module[..], &[name.trim().to_string()]].concat();
        }
        let reexport = t.starts_with("pub use ") || t.starts_with("pub(crate) use ");
        let after_vis = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub(super) "))
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if let Some(tree) = after_vis.strip_prefix("use ") {
            // A `use` may span lines until its `;`.
            let mut tree = tree.to_string();
            while !tree.contains(';') && k + 1 < lines.len() {
                k += 1;
                tree.push_str(lines[k].1);
            }
            let tree = tree.split(';').next().unwrap_or("");
            for path in expand_use(tree) {
                out.extend(resolve(&module, &path).map(|path| Reference {
                    line,
                    path,
                    reexport,
                }));
            }
        } else {
            for (i, _) in code.match_indices("::") {
                let head: String = code[..i]
                    .chars()
                    .rev()
                    .take_while(|&c| is_ident(c))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let before = &code[..i - head.len()];
                if head.is_empty()
                    || before.ends_with("::")
                    || before.ends_with(|c: char| is_ident(c))
                {
                    continue;
                }
                let tail: Vec<String> = code[i + 2..]
                    .split("::")
                    .map(|s| s.chars().take_while(|&c| is_ident(c)).collect::<String>())
                    .take_while(|s| !s.is_empty())
                    .collect();
                let mut path = vec![head];
                path.extend(tail);
                out.extend(resolve(&module, &path).map(|path| Reference {
                    line,
                    path,
                    reexport: false,
                }));
            }
        }
        k += 1;
    }
    out
}

/// Every `crate::NAME` a line names (in `use` lines and inline paths alike).
fn crate_refs(code: &str) -> Vec<String> {
    let file = Source::new("x.rs", code);
    references(&file)
        .into_iter()
        .filter_map(|r| r.path.first().cloned())
        .collect()
}

/// Cycles between the files and folders of one folder (a parent `mod.rs` counts as
/// the node "mod"), each as "folder: a -> b -> a" with the lines that close it.
fn sibling_cycles(files: &[Source]) -> Vec<String> {
    use std::collections::{BTreeSet, HashMap};
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .flat_map(|f| (1..=f.module.len()).map(|n| f.module[..n].to_vec()))
        .collect();
    // folder -> (from, to) -> where
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<(String, String), String>> = BTreeMap::new();
    for f in files {
        for Reference { line, path, .. } in references(f).into_iter().filter(|r| !r.reexport) {
            let d = f
                .module
                .iter()
                .zip(&path)
                .take_while(|(a, b)| a == b)
                .count();
            let folder = f.module[..d].to_vec();
            let node = |m: &[String]| -> String {
                match m.get(d) {
                    Some(n)
                        if modules.contains(&[&folder[..], std::slice::from_ref(n)].concat()) =>
                    {
                        n.clone()
                    }
                    _ => "mod".to_string(),
                }
            };
            let (from, to) = (node(&f.module), node(&path));
            if from != to {
                graphs
                    .entry(folder)
                    .or_default()
                    .entry((from, to))
                    .or_insert_with(|| format!("{}:{line}", f.rel.display()));
            }
        }
    }
    let mut found = Vec::new();
    for (folder, edges) in &graphs {
        let mut next: HashMap<&str, Vec<&str>> = HashMap::new();
        for (a, b) in edges.keys() {
            next.entry(a).or_default().push(b);
        }
        // A depth-first walk from every node; a node met again on the current path
        // closes a cycle.
        let mut reported = BTreeSet::new();
        for start in next.keys() {
            let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
            let mut on_path: Vec<&str> = vec![start];
            while let Some((node, i)) = stack.pop() {
                let outs = next.get(node).map(Vec::as_slice).unwrap_or(&[]);
                if i < outs.len() {
                    stack.push((node, i + 1));
                    let to = outs[i];
                    if let Some(pos) = on_path.iter().position(|n| *n == to) {
                        let mut cycle: Vec<&str> = on_path[pos..].to_vec();
                        let lowest = (0..cycle.len()).min_by_key(|&j| cycle[j]).unwrap();
                        cycle.rotate_left(lowest);
                        if reported.insert(cycle.clone()) {
                            let mut names = cycle.clone();
                            names.push(cycle[0]);
                            let wheres: Vec<&str> = names
                                .windows(2)
                                .map(|w| edges[&(w[0].to_string(), w[1].to_string())].as_str())
                                .collect();
                            found.push(format!(
                                "{}: {} ({})",
                                if folder.is_empty() {
                                    "src".to_string()
                                } else {
                                    folder.join("/")
                                },
                                names.join(" -> "),
                                wheres.join(", ")
                            ));
                        }
                    } else if next.contains_key(to) {
                        stack.push((to, 0));
                        on_path.push(to);
                    }
                } else {
                    on_path.pop();
                }
            }
        }
    }
    found
}

#[test]
fn files_in_a_folder_do_not_import_each_other_in_a_circle() {
    let cycles = sibling_cycles(&library_files());
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_checker_sees_a_sibling_cycle_however_it_is_written() {
    // The cycle of 1ec16a3: `Ablation` one way, `fold_of`/`Pooled` the other.
    let planted = [
        Source::new("train/peers.rs", "use super::recipe::Ablation;\n"),
        Source::new(
            "train/recipe.rs",
            "use super::fusion::{self, Role};\nuse super::peers::{self, FOLDS, PeerData, PeerReport, Pooled, fold_of};\n",
        ),
        Source::new("train/fusion.rs", "use crate::nn::x;\n"),
    ];
    let cycles = sibling_cycles(&planted);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("train: peers -> recipe -> peers"),
        "{cycles:?}"
    );
    // Grouped from the crate root, inline, and through a parent mod.rs.
    let grouped = [
        Source::new(
            "train/peers.rs",
            "use crate::{nn::y, train::{metrics, recipe::Ablation}};\n",
        ),
        Source::new(
            "train/recipe/mod.rs",
            "mod data;\nfn f() { let p = crate::train::peers::run(); }\n",
        ),
        Source::new("train/recipe/data.rs", "use super::Data;\n"),
        Source::new("train/metrics.rs", ""),
    ];
    let cycles = sibling_cycles(&grouped);
    assert!(
        cycles
            .iter()
            .any(|c| c.starts_with("train: peers -> recipe -> peers")),
        "{cycles:?}"
    );
    // mod.rs names data (an inline path) and data names an item of mod.rs.
    let parent = [
        Source::new(
            "train/recipe/mod.rs",
            "mod data;\nfn run() { data::load(); }\n",
        ),
        Source::new("train/recipe/data.rs", "use super::RecipeOptions;\n"),
    ];
    let cycles = sibling_cycles(&parent);
    assert!(
        cycles
            .iter()
            .any(|c| c.contains("train/recipe: data -> mod -> data")),
        "{cycles:?}"
    );
    // One way only is no cycle.
    let one_way = [
        Source::new("train/peers.rs", "use super::report::Ablation;\n"),
        Source::new(
            "train/recipe.rs",
            "use super::{peers::run, report::Ablation};\n",
        ),
        Source::new("train/report.rs", ""),
    ];
    assert!(sibling_cycles(&one_way).is_empty());
}

#[test]
fn imports_point_down_the_floors_only() {
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let mut wrong = Vec::new();
    let files = library_files();
    assert!(files.len() > 40, "read only {} library files", files.len());
    for file in &files {
        let rel = &file.rel;
        let from = top_module(rel);
        let Some(&here) = floors.get(from.as_str()) else {
            wrong.push(format!(
                "{}: module `{from}` has no floor in FLOORS",
                rel.display()
            ));
            continue;
        };
        for Reference { line, path, .. } in references(file) {
            let Some(to) = path.first().cloned() else {
                continue;
            };
            {
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
    for Source { rel, text, .. } in library_files() {
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
    for Source { rel, text, .. } in library_files() {
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
        crate_refs("let x = crate::util::hex(&b) + crate::nn::f(); // crate::train"),
        ["util", "nn"]
    );
    assert!(crate_refs("use marquee::train;").is_empty());
    assert_eq!(
        crate_refs("use crate::{nn::a, util::{b, c}};"),
        ["nn", "util", "util"]
    );
    let code: Vec<_> = code_lines("//! crate::train\nuse crate::nn::x; // crate::train").collect();
    assert_eq!(code.len(), 1);
    assert_eq!(crate_refs(code[0].1), ["nn"]);
}
