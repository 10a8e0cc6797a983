//! Regular expressions as Envoy runs them: RE2 syntax, matched against the whole value.
//!
//! The `regex` crate's syntax is a superset of RE2's; what RE2 (and so Envoy) would refuse is
//! refused here too, so a rule that loads here also loads in Istio: class set operations
//! (`[a&&b]`, `[a--b]`, `[a~~b]`), the flags RE2 lacks (`x`, `R`, `u`), the word-boundary
//! assertions it lacks (`\<`, `\>`, `\b{start}`…) and counted repetitions above 1000. Back
//! references and look-around are refused by both. RE2's Perl classes and word boundaries are
//! ASCII (`\d` is `[0-9]`), the `regex` crate's Unicode: they are rewritten to RE2's meaning.
use std::fmt;

use regex::{Regex, RegexBuilder};
use regex_syntax::ast::{self, Ast, Visitor};

/// RE2's limit on `{n}`, `{n,}` and `{n,m}`.
const RE2_MAX_REPEAT: u32 = 1000;
/// A bound on the compiled program, in the spirit of Envoy's `max_program_size`.
const SIZE_LIMIT: usize = 1 << 20;

/// A compiled full-match regex and the text it was written as.
#[derive(Clone)]
pub struct Re2 {
    source: String,
    full: Regex,
    /// The same pattern unanchored, for rewrites that substitute every match.
    anywhere: Regex,
}

impl Re2 {
    /// Compiles `pattern`, refusing what RE2 refuses.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let translated = as_re2(pattern)?;
        let build = |p: &str| {
            RegexBuilder::new(p)
                .size_limit(SIZE_LIMIT)
                .build()
                .map_err(|e| format!("invalid regex {pattern:?}: {e}"))
        };
        Ok(Self {
            source: pattern.to_owned(),
            full: build(&format!("^(?:{translated})$"))?,
            anywhere: build(&translated)?,
        })
    }

    /// Whether the whole of `value` matches (Envoy's `safe_regex`).
    pub fn is_full_match(&self, value: &str) -> bool {
        self.full.is_match(value)
    }

    /// Every match in `value` replaced by `rewrite`, whose `\1`…`\9` name capture groups
    /// (Envoy's `regex_rewrite` substitution).
    pub fn substitute(&self, value: &str, rewrite: &str) -> String {
        self.anywhere
            .replace_all(value, envoy_substitution(rewrite).as_str())
            .into_owned()
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Re2 {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Re2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Re2({:?})", self.source)
    }
}

/// Envoy's substitution syntax (`\1` is group 1, everything else literal) in the `regex`
/// crate's (`${1}`, with `$` escaped).
fn envoy_substitution(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len() + 4);
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let d = chars.next().unwrap_or('0');
                out.push_str("${");
                out.push(d);
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// `pattern` in the `regex` crate's syntax with RE2's meaning, or why RE2 refuses it.
fn as_re2(pattern: &str) -> Result<String, String> {
    let ast = ast::parse::ParserBuilder::new()
        .nest_limit(1000)
        .build()
        .parse(pattern)
        .map_err(|e| format!("invalid regex {pattern:?}: {e}"))?;
    let mut edits = ast::visit(&ast, Re2Check::default()).map_err(|why| {
        format!("invalid regex {pattern:?}: {why} (not RE2 syntax, which Envoy uses)")
    })?;
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = pattern.to_owned();
    for (start, end, text) in edits {
        out.replace_range(start..end, text);
    }
    Ok(out)
}

/// RE2's ASCII meaning of a Perl class, outside a bracket class and inside one.
fn ascii_perl(class: &ast::ClassPerl) -> (&'static str, &'static str) {
    use ast::ClassPerlKind::*;
    match (&class.kind, class.negated) {
        (Digit, false) => ("[0-9]", "[:digit:]"),
        (Digit, true) => ("[^0-9]", "[:^digit:]"),
        (Word, false) => ("[0-9A-Za-z_]", "[:word:]"),
        (Word, true) => ("[^0-9A-Za-z_]", "[:^word:]"),
        (Space, false) => (r"[\t\n\x0C\r ]", r"\t\n\x0C\r "),
        // POSIX space also holds \v, which RE2's \S would match: the one place this differs.
        (Space, true) => (r"[^\t\n\x0C\r ]", "[:^space:]"),
    }
}

/// Checks for what RE2 lacks, and collects the rewrites to RE2's ASCII classes.
#[derive(Default)]
struct Re2Check {
    edits: Vec<(usize, usize, &'static str)>,
}

impl Visitor for Re2Check {
    type Output = Vec<(usize, usize, &'static str)>;
    type Err = String;

    fn finish(self) -> Result<Self::Output, String> {
        Ok(self.edits)
    }

    fn visit_class_set_item_pre(&mut self, item: &ast::ClassSetItem) -> Result<(), String> {
        if let ast::ClassSetItem::Perl(p) = item {
            self.edits
                .push((p.span.start.offset, p.span.end.offset, ascii_perl(p).1));
        }
        Ok(())
    }

    fn visit_pre(&mut self, ast: &Ast) -> Result<(), String> {
        match ast {
            Ast::Repetition(r) => {
                let n = match r.op.kind {
                    ast::RepetitionKind::Range(ast::RepetitionRange::Exactly(n))
                    | ast::RepetitionKind::Range(ast::RepetitionRange::AtLeast(n)) => n,
                    ast::RepetitionKind::Range(ast::RepetitionRange::Bounded(a, b)) => a.max(b),
                    _ => 0,
                };
                if n > RE2_MAX_REPEAT {
                    return Err(format!("a counted repetition above {RE2_MAX_REPEAT}"));
                }
            }
            Ast::Flags(f) => check_flags(&f.flags)?,
            Ast::Group(g) => {
                if let ast::GroupKind::NonCapturing(flags) = &g.kind {
                    check_flags(flags)?;
                }
            }
            Ast::ClassPerl(p) => {
                self.edits
                    .push((p.span.start.offset, p.span.end.offset, ascii_perl(p).0));
            }
            Ast::Assertion(a) => {
                use ast::AssertionKind::*;
                let ascii = match a.kind {
                    StartLine | EndLine | StartText | EndText => None,
                    WordBoundary => Some(r"(?-u:\b)"),
                    NotWordBoundary => Some(r"(?-u:\B)"),
                    _ => return Err("a word-boundary assertion RE2 lacks".into()),
                };
                if let Some(text) = ascii {
                    self.edits
                        .push((a.span.start.offset, a.span.end.offset, text));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn visit_class_set_binary_op_pre(&mut self, _: &ast::ClassSetBinaryOp) -> Result<(), String> {
        Err("a class set operation (&&, --, ~~)".into())
    }
}

fn check_flags(flags: &ast::Flags) -> Result<(), String> {
    for item in &flags.items {
        if let ast::FlagsItemKind::Flag(f) = item.kind {
            if !matches!(
                f,
                ast::Flag::CaseInsensitive
                    | ast::Flag::MultiLine
                    | ast::Flag::DotMatchesNewLine
                    | ast::Flag::SwapGreed
            ) {
                return Err(format!("the flag {f:?}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_are_whole_values() {
        let r = Re2::new(r"\d+").unwrap();
        assert!(r.is_full_match("123"));
        assert!(!r.is_full_match("a123"), "no partial match");
        assert!(!r.is_full_match("123a"));
        let alt = Re2::new("a|b").unwrap();
        assert!(
            alt.is_full_match("b") && !alt.is_full_match("ab"),
            "alternation is grouped"
        );
    }

    #[test]
    fn what_re2_refuses_is_refused() {
        for bad in [
            "(",
            "a{1001}",
            "a{2,1001}",
            r"(a)\1",
            "(?=a)",
            "(?x) a",
            "[a-z&&[^q]]",
            "[a--b]",
            r"\<word",
            r"\b{start}x",
        ] {
            assert!(Re2::new(bad).is_err(), "{bad:?} should be refused");
        }
        for good in [
            "a{1000}",
            "(?i)abc",
            "(?s:.)",
            r"^/api/v\d+/.*$",
            r"\bx\B",
            "(?P<id>[0-9]+)",
            r"\p{Greek}+",
        ] {
            assert!(
                Re2::new(good).is_ok(),
                "{good:?}: {:?}",
                Re2::new(good).err()
            );
        }
    }

    #[test]
    fn perl_classes_are_ascii_as_in_re2() {
        let d = Re2::new(r"\d+").unwrap();
        assert!(
            d.is_full_match("42") && !d.is_full_match("٤٢"),
            "Arabic-Indic digits are not \\d"
        );
        let w = Re2::new(r"[\w-]+\s\S").unwrap();
        assert!(w.is_full_match("a_b-1 x") && !w.is_full_match("é x"));
        let not_digit = Re2::new(r"[\D]").unwrap();
        assert!(not_digit.is_full_match("a") && !not_digit.is_full_match("5"));
        let b = Re2::new(r"\bé").unwrap();
        assert!(!b.is_full_match("é"), "é is not a word character for RE2");
    }

    #[test]
    fn substitutions_use_envoy_group_syntax() {
        let r = Re2::new("^/service/([^/]+)(/.*)$").unwrap();
        assert_eq!(
            r.substitute("/service/foo/v1/api", r"\2/instance/\1"),
            "/v1/api/instance/foo"
        );
        let dollar = Re2::new("x").unwrap();
        assert_eq!(dollar.substitute("axb", "$1"), "a$1b", "`$` is literal");
    }
}
