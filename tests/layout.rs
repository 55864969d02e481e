//! The source tree's imports go one way: no two files of the crate use each other,
//! directly or round a longer loop, so that each file can be read knowing only the
//! files below it. The one loop allowed is a layer and its service (`ApiKeyLayer`
//! makes `ApiKeyService`, which hands back a layer).
//!
//! The crate's modules are found as the compiler finds them, from `src/lib.rs` along
//! its `mod` lines (a `#[path]` included); every path a file names (`use` lines,
//! types, calls) is resolved to the file that defines the module it goes through. A
//! folder's `mod.rs` (and the crate's `lib.rs`) is its front: what it takes from
//! inside its own folder (to hand on, or to put together) is not counted; what the
//! folder's files take from it is.
//! Unit tests (`#[cfg(test)]`) are left out: they may use what they test.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Loops allowed, as the set of files in each.
const ALLOWED: &[&[&str]] = &[&["src/layer/mod.rs", "src/layer/service.rs"]];

/// A module: its path from the crate root, and the file it is written in.
#[derive(Debug)]
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Every module that has a file of its own, from `lib.rs` down.
fn modules(root: &Path) -> Vec<Module> {
    let mut found = Vec::new();
    let mut todo = vec![(vec!["crate".to_owned()], root.join("src/lib.rs"), true)];
    while let Some((path, file, owns_dir)) = todo.pop() {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap();
        let dir = if owns_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for item in &ast.items {
            let syn::Item::Mod(m) = item else { continue };
            if m.content.is_some() || is_test(&m.attrs) {
                continue;
            }
            let name = m.ident.to_string();
            let mut child = path.clone();
            child.push(name.clone());
            let (child_file, child_owns) = match path_attr(&m.attrs) {
                Some(p) => (dir.join(p), false),
                None if dir.join(&name).join("mod.rs").exists() => {
                    (dir.join(&name).join("mod.rs"), true)
                }
                None => (dir.join(format!("{name}.rs")), false),
            };
            todo.push((child, child_file, child_owns));
        }
        found.push(Module { path, file });
    }
    found
}

/// Compiled only for tests: `#[cfg(test)]`, or `#[cfg(all(test, …))]`.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    fn test_only(meta: &syn::Meta) -> bool {
        match meta {
            syn::Meta::Path(p) => p.is_ident("test"),
            syn::Meta::List(list) if list.path.is_ident("all") => list
                .parse_args_with(
                    syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
                )
                .is_ok_and(|all| all.iter().any(test_only)),
            _ => false,
        }
    }
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| test_only(&m))
    })
}

fn path_attr(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

/// The paths one file names, each as written, with the module it is written in.
struct Names {
    /// The module path of the code being walked (a file's, then its inline modules').
    at: Vec<String>,
    /// Names brought in by `use`, per module: the last segment (or alias) → full path.
    aliases: Aliases,
    /// `use …::*` prefixes, per module, as written.
    globs: HashMap<Vec<String>, Vec<Vec<String>>>,
    found: Vec<(Vec<String>, Vec<String>)>,
}

/// Per module: a name brought in by `use` → the path it stands for, as written there.
type Aliases = HashMap<Vec<String>, HashMap<String, Vec<String>>>;

impl Names {
    fn use_tree(&mut self, prefix: &[String], tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                let mut next = prefix.to_vec();
                next.push(p.ident.to_string());
                self.use_tree(&next, &p.tree);
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.to_vec();
                let name = n.ident.to_string();
                if name != "self" {
                    full.push(name.clone());
                }
                let alias = full.last().cloned().unwrap_or(name);
                self.add_use(alias, full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.to_vec();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.add_use(r.rename.to_string(), full);
            }
            syn::UseTree::Glob(_) => {
                self.found.push((self.at.clone(), prefix.to_vec()));
                self.globs
                    .entry(self.at.clone())
                    .or_default()
                    .push(prefix.to_vec());
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn add_use(&mut self, alias: String, full: Vec<String>) {
        self.found.push((self.at.clone(), full.clone()));
        self.aliases
            .entry(self.at.clone())
            .or_default()
            .insert(alias, full);
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&[], &u.tree);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        if let Some((_, items)) = &m.content {
            self.at.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.at.pop();
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.found.push((self.at.clone(), segments));
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // A macro's arguments are code too (`tracing::error!(…, a = %crate::x::y)`,
        // `vec![T::new(); n]`): every `a::b` in its tokens is a path it names.
        let mut paths = Vec::new();
        let _ =
            m.parse_body_with(|input: syn::parse::ParseStream<'_>| token_paths(input, &mut paths));
        for path in paths {
            self.found.push((self.at.clone(), path));
        }
        syn::visit::visit_macro(self, m);
    }
}

/// Every `a::b…` in a stream of tokens, groups included.
fn token_paths(input: syn::parse::ParseStream<'_>, out: &mut Vec<Vec<String>>) -> syn::Result<()> {
    use syn::ext::IdentExt as _;
    let mut current: Vec<String> = Vec::new();
    let mut joined = false;
    let flush = |current: &mut Vec<String>, out: &mut Vec<Vec<String>>| {
        if current.len() > 1 {
            out.push(std::mem::take(current));
        }
        current.clear();
    };
    while !input.is_empty() {
        if input.peek(syn::Token![::]) {
            input.parse::<syn::Token![::]>()?;
            joined = !current.is_empty();
            continue;
        }
        if input.peek(syn::Ident::peek_any) {
            let ident = syn::Ident::parse_any(input)?.to_string();
            if !joined {
                flush(&mut current, out);
            }
            current.push(ident);
            joined = false;
            continue;
        }
        flush(&mut current, out);
        joined = false;
        let content;
        if input.peek(syn::token::Paren) {
            syn::parenthesized!(content in input);
        } else if input.peek(syn::token::Bracket) {
            syn::bracketed!(content in input);
        } else if input.peek(syn::token::Brace) {
            syn::braced!(content in input);
        } else {
            input.step(|cursor| match cursor.token_tree() {
                Some((_, next)) => Ok(((), next)),
                None => Err(cursor.error("no token")),
            })?;
            continue;
        }
        token_paths(&content, out)?;
    }
    flush(&mut current, out);
    Ok(())
}

/// What the whole crate declares: its modules (inline ones included), and each
/// module's `use` names and globs.
struct Crate {
    modules: BTreeSet<Vec<String>>,
    aliases: Aliases,
    globs: HashMap<Vec<String>, Vec<Vec<String>>>,
}

impl Crate {
    /// `path`, named in module `at`, made absolute (`crate::…`) and followed through
    /// the `use` names it goes through (a folder's `pub use self::x::T`, a glob), if
    /// it is the crate's.
    fn resolve(&self, at: &[String], path: &[String], depth: usize) -> Option<Vec<String>> {
        if depth > 8 {
            return None;
        }
        let full = self.absolute(at, path, depth)?;
        // The longest module the path goes through, and the name after it: a name
        // that module brought in by `use` stands for what it names.
        let n = (1..=full.len())
            .rev()
            .find(|n| self.modules.contains(&full[..*n]))?;
        if let Some(name) = full.get(n)
            && let Some(target) = self.aliases.get(&full[..n]).and_then(|a| a.get(name))
        {
            let mut joined = target.clone();
            joined.extend_from_slice(&full[n + 1..]);
            if let Some(followed) = self.resolve(&full[..n], &joined, depth + 1) {
                return Some(followed);
            }
        }
        Some(full)
    }

    fn absolute(&self, at: &[String], path: &[String], depth: usize) -> Option<Vec<String>> {
        if depth > 8 {
            return None;
        }
        let first = path.first()?;
        let mut out = at.to_vec();
        let rest: &[String];
        match first.as_str() {
            "crate" => return Some(path.to_vec()),
            "self" => rest = &path[1..],
            "super" => {
                let mut i = 0;
                while path.get(i).is_some_and(|s| s == "super") {
                    out.pop();
                    i += 1;
                }
                rest = &path[i..];
            }
            _ => {
                out.push(first.clone());
                if self.modules.contains(&out) {
                    rest = &path[1..];
                } else if let Some(full) = self.aliases.get(at).and_then(|a| a.get(first))
                    && full.first() != Some(first)
                {
                    let mut joined = full.clone();
                    joined.extend_from_slice(&path[1..]);
                    return self.resolve(at, &joined, depth + 1);
                } else {
                    // Through a glob (`use super::*`): a module or a `use` name of the
                    // module it opens.
                    for glob in self.globs.get(at).into_iter().flatten() {
                        let Some(base) = self.absolute(at, glob, depth + 1) else {
                            continue;
                        };
                        let mut child = base.clone();
                        child.push(first.clone());
                        let named = self
                            .aliases
                            .get(&base)
                            .is_some_and(|a| a.contains_key(first));
                        if base != at && (self.modules.contains(&child) || named) {
                            let mut joined = base;
                            joined.extend_from_slice(path);
                            return self.resolve(at, &joined, depth + 1);
                        }
                    }
                    return None;
                }
            }
        }
        out.extend_from_slice(rest);
        Some(out)
    }
}

#[test]
fn no_two_files_import_each_other() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let modules = modules(&root);
    let mut file_of: BTreeMap<Vec<String>, PathBuf> = BTreeMap::new();
    for m in &modules {
        file_of.insert(m.path.clone(), m.file.clone());
    }
    // First what every file declares, then what each names.
    let mut krate = Crate {
        modules: modules.iter().map(|m| m.path.clone()).collect(),
        aliases: HashMap::new(),
        globs: HashMap::new(),
    };
    let mut found = Vec::new();
    for m in &modules {
        let ast = syn::parse_file(&std::fs::read_to_string(&m.file).unwrap()).unwrap();
        let mut names = Names {
            at: m.path.clone(),
            aliases: HashMap::new(),
            globs: HashMap::new(),
            found: Vec::new(),
        };
        for item in &ast.items {
            if let syn::Item::Mod(inner) = item
                && inner.content.is_some()
                && !is_test(&inner.attrs)
            {
                let mut p = m.path.clone();
                p.push(inner.ident.to_string());
                krate.modules.insert(p);
            }
        }
        names.visit_file(&ast);
        krate.aliases.extend(names.aliases);
        krate.globs.extend(names.globs);
        found.push((m, names.found));
    }
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (m, paths) in found {
        let is_face = m.file.ends_with("mod.rs") || m.file.ends_with("lib.rs");
        for (at, path) in &paths {
            let Some(full) = krate.resolve(at, path, 0) else {
                continue;
            };
            // The file of the longest module prefix of the path.
            let Some(target) = (1..=full.len()).rev().find_map(|n| file_of.get(&full[..n])) else {
                continue;
            };
            if *target == m.file {
                continue;
            }
            // A folder's front (its `mod.rs`, the crate's `lib.rs`) handing on or
            // putting together what is inside it: the folder itself, not a loop.
            if is_face && target.starts_with(m.file.parent().unwrap()) {
                continue;
            }
            edges
                .entry(m.file.clone())
                .or_default()
                .insert(target.clone());
        }
    }
    let loops = strongly_connected(&edges);
    let shown: Vec<Vec<String>> = loops
        .into_iter()
        .map(|scc| {
            scc.iter()
                .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|names| {
            !ALLOWED.iter().any(|allowed| {
                allowed.len() == names.len() && names.iter().all(|n| allowed.contains(&n.as_str()))
            })
        })
        .collect();
    assert!(
        shown.is_empty(),
        "files that import each other (round a loop): {shown:#?}\nedges: {:#?}",
        shown
            .iter()
            .flatten()
            .map(|f| (f, edges.get(&root.join(f))))
            .collect::<Vec<_>>()
    );
    // The check sees what it should: the crate's files import one another a lot.
    assert!(modules.len() > 50, "only {} modules found", modules.len());
    assert!(edges.values().map(BTreeSet::len).sum::<usize>() > 100);
}

/// The loops of more than one file (Tarjan's strongly connected components).
fn strongly_connected(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<BTreeSet<PathBuf>> {
    struct State<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: HashMap<&'a PathBuf, usize>,
        low: HashMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        next: usize,
        found: Vec<BTreeSet<PathBuf>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a PathBuf) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.insert(w.clone());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                s.found.push(scc);
            }
        }
    }
    let mut s = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}
