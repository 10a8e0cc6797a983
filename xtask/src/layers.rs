//! The node proxy's modules stand in layers: between sibling modules (the children of one
//! module, at any depth), the `crate::` and `super::` paths of `ztunnel/src` form no circle.
//! A child may use its parent's items and a parent its children's; that is not a circle.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

type Module = Vec<String>;

/// The module a source file defines, from its path below `src/`.
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn files(dir: &Path, root: &Path, out: &mut Vec<(Module, String)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            files(&path, root, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            // The binaries are crates of their own.
            if rel == Path::new("main.rs") || rel.starts_with("bin") {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            out.push((module_of(rel), text));
        }
    }
}

/// Every path of a use-tree starting at `s[i..]` (`a::b`, `a::{b, c::{d}}`, `a::*`).
fn use_tree(s: &[u8], mut i: usize) -> Vec<Vec<String>> {
    fn skip(s: &[u8], mut i: usize) -> usize {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    }
    fn tree(s: &[u8], i: usize) -> (Vec<Vec<String>>, usize) {
        let mut i = skip(s, i);
        if s.get(i) == Some(&b'{') {
            let mut out = Vec::new();
            i += 1;
            loop {
                i = skip(s, i);
                match s.get(i) {
                    Some(b'}') => return (out, i + 1),
                    None => return (out, i),
                    _ => {}
                }
                let (sub, next) = tree(s, i);
                out.extend(sub);
                i = skip(s, next);
                match s.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return (out, i + 1),
                    _ => return (out, i),
                }
            }
        }
        let start = i;
        while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b'*') {
            i += 1;
        }
        if start == i {
            return (vec![vec![]], i);
        }
        let segment = String::from_utf8_lossy(&s[start..i]).into_owned();
        if s[i..].starts_with(b"::") {
            let (sub, next) = tree(s, i + 2);
            let paths = sub
                .into_iter()
                .map(|mut p| {
                    p.insert(0, segment.clone());
                    p
                })
                .collect();
            return (paths, next);
        }
        (vec![vec![segment]], i)
    }
    i = skip(s, i);
    tree(s, i).0
}

/// The import circles among sibling modules of the crate whose sources are in `src`, each as
/// its sorted module names.
pub fn circles(src: &Path) -> Vec<Vec<String>> {
    let mut sources = Vec::new();
    files(src, src, &mut sources);
    let modules: BTreeSet<Module> = sources.iter().map(|(m, _)| m.clone()).collect();
    let resolve = |path: &[String]| -> Module {
        (1..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|p| modules.contains(p))
            .unwrap_or_default()
    };
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, text) in &sources {
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let bytes = code.as_bytes();
        for (kind, needle) in [("crate", "crate::"), ("super", "super::")] {
            let mut from = 0;
            while let Some(at) = code[from..].find(needle) {
                let at = from + at;
                from = at + needle.len();
                let boundary = at == 0 || {
                    let c = bytes[at - 1];
                    !(c.is_ascii_alphanumeric() || c == b'_')
                };
                if !boundary {
                    continue;
                }
                for path in use_tree(bytes, at + needle.len()) {
                    let full: Module = if kind == "crate" {
                        path
                    } else {
                        // `super` is the parent of the module (`b/x.rs` → `b`, `b/mod.rs` → root).
                        let mut base = module[..module.len().saturating_sub(1)].to_vec();
                        let mut rest = path.as_slice();
                        while rest.first().is_some_and(|s| s == "super") {
                            base.pop();
                            rest = &rest[1..];
                        }
                        base.extend(rest.iter().cloned());
                        base
                    };
                    let target = resolve(&full);
                    if &target != module {
                        edges.entry(module.clone()).or_default().insert(target);
                    }
                }
            }
        }
    }
    // Lifted to the two siblings under the modules' closest common ancestor.
    let mut siblings: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (a, targets) in &edges {
        for b in targets {
            let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            if common < a.len() && common < b.len() {
                siblings
                    .entry(a[..=common].to_vec())
                    .or_default()
                    .insert(b[..=common].to_vec());
            }
        }
    }
    strongly_connected(&siblings)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            names.sort();
            names
        })
        .collect()
}

/// Tarjan's strongly connected components.
fn strongly_connected(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(st: &mut State<'a>, v: &'a Module) {
        let n = st.index.len();
        st.index.insert(v, n);
        st.low.insert(v, n);
        st.stack.push(v);
        st.on_stack.insert(v);
        for w in st.graph.get(v).into_iter().flatten() {
            if !st.index.contains_key(w) {
                visit(st, w);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if st.on_stack.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut component = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            st.out.push(component);
        }
    }
    let mut st = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&Module> = graph.keys().chain(graph.values().flatten()).collect();
    for v in nodes {
        if !st.index.contains_key(v) {
            visit(&mut st, v);
        }
    }
    st.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_trees_expand_to_paths() {
        let paths = use_tree(b"{a::b, c::{d, e::*}, f}; rest", 0);
        let flat: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
        assert_eq!(flat, ["a::b", "c::d", "c::e::*", "f"]);
    }

    #[test]
    fn a_circle_between_siblings_is_found_and_parent_child_use_is_not_one() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("b")).unwrap();
        let write = |p: &str, t: &str| fs::write(dir.join(p), t).unwrap();
        write("lib.rs", "pub mod a; pub mod b; pub mod c;");
        write("a.rs", "use crate::b::x::Thing;");
        write(
            "b/mod.rs",
            "pub mod x; pub use x::Thing; fn f() { super::c::g() }",
        );
        write("b/x.rs", "use super::f; use crate::a::Other;");
        write("c.rs", "pub fn g() {}");
        let found = circles(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, [["a", "b"]]);
    }

    /// The node proxy's modules: no circle (docs/architecture.md draws the layers).
    #[test]
    fn ztunnel_modules_import_no_circles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ztunnel/src");
        assert!(src.join("lib.rs").is_file(), "{} not found", src.display());
        let found = circles(&src);
        assert!(
            found.is_empty(),
            "import circles between modules: {found:?}"
        );
    }
}
