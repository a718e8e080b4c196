//! Every relative link of the README and the guides in `docs/` resolves: the
//! file or directory it names exists, and an `#anchor` names a heading of
//! the page it points to.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The pages checked: the README and every guide in `docs/`.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    pages
}

/// The page's text outside fenced code blocks and inline code spans, where
/// `[text](target)` is a link.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of the inline links `[text](target)` of a page.
fn links(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) => {
                // A title after the target (`(file "title")`) is not part of it.
                let target = after[..end].split_whitespace().next().unwrap_or_default();
                out.push(target.to_owned());
                rest = &after[end..];
            }
            None => break,
        }
    }
    out
}

/// The anchors a page's headings get, as GitHub makes them: lower case,
/// punctuation dropped, spaces as hyphens, `-1`, `-2` … for repeats.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 1;
        while seen.contains(&unique) {
            unique = format!("{slug}-{n}");
            n += 1;
        }
        seen.insert(unique);
    }
    seen
}

/// What is wrong with one link of `page`, if anything.
fn broken(page: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        page.to_path_buf()
    } else {
        page.parent()
            .expect("a page sits in a directory")
            .join(path)
    };
    if !file.exists() {
        return Some(format!("{target}: {} does not exist", file.display()));
    }
    let anchor = anchor.filter(|a| !a.is_empty())?;
    if file.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let text = std::fs::read_to_string(&file).expect("read the linked page");
    if anchors(&text).contains(anchor) {
        None
    } else {
        Some(format!(
            "{target}: no heading of {} gives #{anchor}",
            file.display()
        ))
    }
}

#[test]
fn every_relative_link_of_the_readme_and_the_guides_resolves() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read the page");
        for target in links(&text) {
            checked += 1;
            if let Some(p) = broken(&page, &target) {
                problems.push(format!("{}: {p}", page.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: the parser lost them"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_what_is_broken() {
    // The same rules on a page of its own: a missing file, a missing
    // anchor, and links it must leave alone.
    let page = root().join("README.md");
    assert!(broken(&page, "docs/no-such-page.md").is_some());
    assert!(broken(&page, "docs/design.md#no-such-heading").is_some());
    assert!(broken(&page, "docs/design.md#the-recovery-signal").is_none());
    assert!(broken(&page, "https://example.invalid/x").is_none());
    assert!(broken(&page, "observability/").is_none());
    let md = "# A `code` title\n## Twice\n## Twice\n```\n# not a heading\n```\n";
    let a = anchors(md);
    assert!(a.contains("a-code-title") && a.contains("twice") && a.contains("twice-1"));
    assert!(!a.contains("not-a-heading"));
    assert_eq!(
        links("see [x](a.md) and `[y](b.md)` and\n```\n[z](c.md)\n```\n[w](d.md#e)"),
        vec!["a.md".to_owned(), "d.md#e".to_owned()]
    );
}
