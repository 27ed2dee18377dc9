//! Filters on the virtual site column (`site`, `peer_name`, `peer_key`),
//! decided per site.
//!
//! A client's filter stack (and each `Stats:` expression) may test the site
//! column anywhere: with any string operator, under `And:`, `Or:` and
//! `Negate:`. No site knows that column, so livemux reads the stack into an
//! [`Expr`], and for each site decides every site test (the column's value
//! is the site's name), simplifies what is left, skips a site whose filter
//! is false, and sends the others the residual stack, which holds only the
//! site's own columns. The answer is then what the whole filter gives on
//! the merged rows: the property test in `tests.rs` checks exactly that
//! against a direct evaluation of random stacks over random rows.

use std::fmt::Write as _;

/// A string comparison as Livestatus defines it for string columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `~`: the regular expression matches somewhere.
    Match,
    /// `!~`
    NoMatch,
    /// `=~`: equal, ignoring case.
    EqIcase,
    /// `!=~`
    NeIcase,
    /// `~~`: the regular expression matches, ignoring case.
    MatchIcase,
    /// `!~~`
    NoMatchIcase,
    /// `<` (byte-wise)
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl StrOp {
    /// The operator written in a filter line.
    pub fn parse(op: &str) -> Option<StrOp> {
        Some(match op {
            "=" => StrOp::Eq,
            "!=" => StrOp::Ne,
            "~" => StrOp::Match,
            "!~" => StrOp::NoMatch,
            "=~" => StrOp::EqIcase,
            "!=~" => StrOp::NeIcase,
            "~~" => StrOp::MatchIcase,
            "!~~" => StrOp::NoMatchIcase,
            "<" => StrOp::Lt,
            "<=" => StrOp::Le,
            ">" => StrOp::Gt,
            ">=" => StrOp::Ge,
            _ => return None,
        })
    }
}

/// One test of a string value: `<op> <arg>`.
#[derive(Debug, Clone)]
pub struct StrTest {
    op: StrOp,
    arg: String,
    re: Option<regex::Regex>,
}

impl StrTest {
    /// The test `op arg`; a regular expression that does not compile is refused.
    pub fn new(op: StrOp, arg: &str) -> Result<StrTest, String> {
        let re = match op {
            StrOp::Match | StrOp::NoMatch | StrOp::MatchIcase | StrOp::NoMatchIcase => {
                let icase = matches!(op, StrOp::MatchIcase | StrOp::NoMatchIcase);
                let re = regex::RegexBuilder::new(arg)
                    .case_insensitive(icase)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("invalid regular expression '{arg}': {e}"))?;
                Some(re)
            }
            _ => None,
        };
        Ok(StrTest { op, arg: arg.to_owned(), re })
    }

    /// Whether `value` passes.
    pub fn matches(&self, value: &str) -> bool {
        let found = || self.re.as_ref().is_some_and(|re| re.is_match(value));
        match self.op {
            StrOp::Eq => value == self.arg,
            StrOp::Ne => value != self.arg,
            StrOp::EqIcase => value.to_lowercase() == self.arg.to_lowercase(),
            StrOp::NeIcase => value.to_lowercase() != self.arg.to_lowercase(),
            StrOp::Match | StrOp::MatchIcase => found(),
            StrOp::NoMatch | StrOp::NoMatchIcase => !found(),
            StrOp::Lt => value < self.arg.as_str(),
            StrOp::Le => value <= self.arg.as_str(),
            StrOp::Gt => value > self.arg.as_str(),
            StrOp::Ge => value >= self.arg.as_str(),
        }
    }
}

/// A filter expression read from a stack of lines.
#[derive(Debug, Clone)]
pub enum Expr {
    /// A line the sites evaluate (the text after `Filter: ` or `Stats: `).
    Line(String),
    /// A test of the site column.
    Site(Box<StrTest>),
    /// All of these (`And: 0` is true).
    And(Vec<Expr>),
    /// Any of these (`Or: 0` is false).
    Or(Vec<Expr>),
    /// Not this.
    Not(Box<Expr>),
    /// Decided.
    Const(bool),
}

/// The header names of one kind of stack.
#[derive(Debug, Clone, Copy)]
pub struct Keywords {
    /// `Filter` or `Stats`.
    pub atom: &'static str,
    /// `And` or `StatsAnd`.
    pub and: &'static str,
    /// `Or` or `StatsOr`.
    pub or: &'static str,
    /// `Negate` or `StatsNegate`.
    pub negate: &'static str,
}

/// The filter stack's headers.
pub const FILTER: Keywords = Keywords { atom: "Filter", and: "And", or: "Or", negate: "Negate" };
/// A stats expression's headers.
pub const STATS: Keywords = Keywords { atom: "Stats", and: "StatsAnd", or: "StatsOr", negate: "StatsNegate" };

impl Expr {
    /// Whether it tests the site column anywhere.
    pub fn has_site(&self) -> bool {
        match self {
            Expr::Site(_) => true,
            Expr::And(v) | Expr::Or(v) => v.iter().any(Expr::has_site),
            Expr::Not(e) => e.has_site(),
            Expr::Line(_) | Expr::Const(_) => false,
        }
    }

    /// The expression for the site named `site`: its site tests decided,
    /// constants folded away (what is left holds no `Const` unless it is one).
    pub fn for_site(&self, site: &str) -> Expr {
        match self {
            Expr::Site(t) => Expr::Const(t.matches(site)),
            Expr::Line(l) => Expr::Line(l.clone()),
            Expr::Const(b) => Expr::Const(*b),
            Expr::Not(e) => match e.for_site(site) {
                Expr::Const(b) => Expr::Const(!b),
                other => Expr::Not(Box::new(other)),
            },
            Expr::And(v) => fold(v, site, true),
            Expr::Or(v) => fold(v, site, false),
        }
    }

    /// Evaluate with `line` deciding the lines and `site` as the site
    /// column's value (the reference semantics, for tests).
    pub fn eval(&self, site: &str, line: &mut impl FnMut(&str) -> bool) -> bool {
        match self {
            Expr::Line(l) => line(l),
            Expr::Site(t) => t.matches(site),
            Expr::And(v) => v.iter().all(|e| e.eval(site, line)),
            Expr::Or(v) => v.iter().any(|e| e.eval(site, line)),
            Expr::Not(e) => !e.eval(site, line),
            Expr::Const(b) => *b,
        }
    }

    /// Write an expression without site tests as stack lines, its
    /// constants (`And: 0`, `Or: 0`) as they were written; `None` if it is
    /// the constant false at the top (nothing passes).
    pub fn render_plain(&self, kw: Keywords, out: &mut String) -> Option<()> {
        match self {
            Expr::Const(true) => {}
            Expr::Const(false) => return None,
            Expr::And(v) if v.is_empty() => {}
            Expr::Or(v) if v.is_empty() => return None,
            e if e.has_const() => match e.for_site("") {
                Expr::Const(true) => {}
                Expr::Const(false) => return None,
                e => e.render(kw, out),
            },
            e => e.render(kw, out),
        }
        Some(())
    }

    /// Whether a constant (`And: 0`, `Or: 0`) stands somewhere inside.
    fn has_const(&self) -> bool {
        match self {
            Expr::Const(_) => true,
            Expr::And(v) | Expr::Or(v) => v.is_empty() || v.iter().any(Expr::has_const),
            Expr::Not(e) => e.has_const(),
            Expr::Line(_) | Expr::Site(_) => false,
        }
    }

    /// Write it as stack lines (no `Const` and no `Site` may be left: see
    /// [`Expr::for_site`]).
    pub fn render(&self, kw: Keywords, out: &mut String) {
        match self {
            Expr::Line(l) => {
                let _ = writeln!(out, "{}: {l}", kw.atom);
            }
            Expr::And(v) | Expr::Or(v) => {
                for e in v {
                    e.render(kw, out);
                }
                let name = if matches!(self, Expr::And(_)) { kw.and } else { kw.or };
                let _ = writeln!(out, "{name}: {}", v.len());
            }
            Expr::Not(e) => {
                e.render(kw, out);
                let _ = writeln!(out, "{}:", kw.negate);
            }
            // Decided away before rendering; kept harmless if not.
            Expr::Site(_) | Expr::Const(_) => {}
        }
    }
}

/// `And` (`all`) or `Or` of `v` for one site, folded.
fn fold(v: &[Expr], site: &str, all: bool) -> Expr {
    let mut kept = Vec::with_capacity(v.len());
    for e in v {
        match e.for_site(site) {
            // The neutral element goes; the absorbing one decides.
            Expr::Const(b) if b == all => {}
            Expr::Const(b) => return Expr::Const(b),
            other => kept.push(other),
        }
    }
    match kept.len() {
        0 => Expr::Const(all),
        1 => kept.pop().unwrap_or(Expr::Const(all)),
        _ if all => Expr::And(kept),
        _ => Expr::Or(kept),
    }
}

/// A stack of expressions being read (`Filter`/`And`/`Or`/`Negate`, or the
/// count part of the `Stats` lines).
#[derive(Debug, Clone, Default)]
pub struct Stack {
    /// The entries, bottom first.
    pub items: Vec<Expr>,
}

impl Stack {
    /// `And: n` (`all`) or `Or: n`: the top `n` entries combined.
    pub fn combine(&mut self, n: usize, all: bool, name: &str) -> Result<(), String> {
        if n > self.items.len() {
            return Err(format!("{name}: {n} combines more than the {} filters on the stack", self.items.len()));
        }
        let parts = self.items.split_off(self.items.len() - n);
        self.items.push(if all { Expr::And(parts) } else { Expr::Or(parts) });
        Ok(())
    }

    /// `Negate:`: the top entry negated.
    pub fn negate(&mut self, name: &str) -> Result<(), String> {
        let top = self.items.pop().ok_or_else(|| format!("{name}: there is no filter to negate"))?;
        self.items.push(Expr::Not(Box::new(top)));
        Ok(())
    }

    /// Whether any entry tests the site column.
    pub fn has_site(&self) -> bool {
        self.items.iter().any(Expr::has_site)
    }

    /// The filter lines for `site` (the entries are implicitly and-ed);
    /// `None` when the filter is false there (the site is not asked).
    pub fn for_site(&self, site: &str, out: &mut String) -> Option<()> {
        if !self.has_site() {
            // Nothing to decide: the stack as the client wrote it (bar
            // `And: 1` and the like), without copying it.
            for e in &self.items {
                e.render_plain(FILTER, out)?;
            }
            return Some(());
        }
        match fold(&self.items, site, true) {
            Expr::Const(false) => None,
            Expr::Const(true) => Some(()),
            Expr::And(v) => {
                for e in &v {
                    e.render(FILTER, out);
                }
                Some(())
            }
            e => {
                e.render(FILTER, out);
                Some(())
            }
        }
    }
}
