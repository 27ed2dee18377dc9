//! Python literals as Checkmk writes them into `.mk` files: statements
//! `name = value`, `name.update(value)` and `name[key] = value`, whose
//! values are dicts, lists, tuples, strings (single or double quotes, `u`/`r`
//! prefixes, escapes), numbers, `True`, `False` and `None`; `#` comments.
//!
//! Nothing is evaluated: anything else is an error naming its line and
//! column. Nesting is limited ([`MAX_DEPTH`]) so hostile input cannot
//! exhaust the stack.

use std::fmt;

/// Deepest nesting of containers accepted.
pub const MAX_DEPTH: usize = 64;

/// A Python value.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    /// `None`
    None,
    /// `True` / `False`
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (bytes literals are read as text).
    Str(String),
    /// `(...)`
    Tuple(Vec<Py>),
    /// `[...]`
    List(Vec<Py>),
    /// `{...}`, in file order.
    Dict(Vec<(Py, Py)>),
}

impl Py {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Py::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A number as seconds (ints and floats).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Py::Int(n) => Some(*n as f64),
            Py::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// Items of a tuple or list.
    pub fn items(&self) -> Option<&[Py]> {
        match self {
            Py::Tuple(v) | Py::List(v) => Some(v),
            _ => None,
        }
    }

    /// The value under string key `k` of a dict.
    pub fn get(&self, k: &str) -> Option<&Py> {
        match self {
            Py::Dict(kv) => kv.iter().rev().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v),
            _ => None,
        }
    }
}

impl fmt::Display for Py {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Py::None => f.write_str("None"),
            Py::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Py::Int(n) => write!(f, "{n}"),
            Py::Float(x) => write!(f, "{x}"),
            Py::Str(s) => write!(f, "{s:?}"),
            Py::Tuple(v) | Py::List(v) => {
                let (open, close) = if matches!(self, Py::Tuple(_)) { ("(", ")") } else { ("[", "]") };
                f.write_str(open)?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str(close)
            }
            Py::Dict(kv) => {
                f.write_str("{")?;
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// What a statement does to a name.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// `name = value`
    Assign(String, Py),
    /// `name.update(value)`
    Update(String, Py),
    /// `name[key] = value`
    SetItem(String, Py, Py),
}

/// Not a literal this reader accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {what}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (characters).
    pub column: usize,
    /// What was wrong.
    pub what: String,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    _text: &'a str,
}

/// Parse a file's statements.
pub fn parse(text: &str) -> Result<Vec<Statement>, ParseError> {
    let mut p = Parser { chars: text.chars().collect(), pos: 0, _text: text };
    let mut out = Vec::new();
    loop {
        p.skip_space(true);
        if p.peek().is_none() {
            return Ok(out);
        }
        out.push(p.statement()?);
        p.skip_inline_space();
        match p.peek() {
            None => {}
            Some('\n' | ';') => p.pos += 1,
            Some('#') => {}
            Some(c) => return Err(p.error(format!("unexpected '{c}' after a statement"))),
        }
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn error(&self, what: impl Into<String>) -> ParseError {
        let before = &self.chars[..self.pos.min(self.chars.len())];
        let line = before.iter().filter(|c| **c == '\n').count() + 1;
        let column = before.iter().rev().take_while(|c| **c != '\n').count() + 1;
        ParseError { line, column, what: what.into() }
    }

    /// Spaces and comments; newlines too when `newlines`.
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.pos += 1;
                }
            } else if c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n') || c == '\u{feff}' {
                self.pos += 1;
            } else if c == '\\' && self.chars.get(self.pos + 1) == Some(&'\n') {
                self.pos += 2;
            } else {
                break;
            }
        }
    }

    fn skip_inline_space(&mut self) {
        self.skip_space(false);
    }

    fn expect(&mut self, c: char, newlines: bool) -> Result<(), ParseError> {
        self.skip_space(newlines);
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(format!("expected '{c}'")))
        }
    }

    fn name(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        if start == self.pos || self.chars[start].is_ascii_digit() {
            self.pos = start;
            return Err(self.error("expected a name such as `sites`"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        let name = self.name()?;
        self.skip_inline_space();
        match self.peek() {
            Some('=') => {
                self.pos += 1;
                Ok(Statement::Assign(name, self.value(0, false)?))
            }
            Some('.') => {
                self.pos += 1;
                let method = self.name()?;
                if method != "update" {
                    return Err(self.error(format!("only `{name}.update(...)` is understood, not `.{method}`")));
                }
                self.expect('(', false)?;
                let v = self.value(1, true)?;
                self.skip_space(true);
                if self.peek() == Some(',') {
                    self.pos += 1;
                }
                self.expect(')', true)?;
                Ok(Statement::Update(name, v))
            }
            Some('[') => {
                self.pos += 1;
                let key = self.value(1, true)?;
                self.expect(']', true)?;
                self.expect('=', false)?;
                Ok(Statement::SetItem(name, key, self.value(0, false)?))
            }
            _ => Err(self.error(format!("expected `{name} = ...`, `{name}.update(...)` or `{name}[...] = ...`"))),
        }
    }

    /// A value; `newlines` inside brackets.
    fn value(&mut self, depth: usize, newlines: bool) -> Result<Py, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.skip_space(newlines);
        let Some(c) = self.peek() else { return Err(self.error("expected a value, found the end of the file")) };
        match c {
            '{' => self.dict(depth),
            '[' => self.seq(depth, ']').map(Py::List),
            '(' => {
                let start = self.pos;
                let (items, trailing_comma) = self.seq_with_comma(depth, ')')?;
                match items.len() {
                    1 if !trailing_comma => Ok(items.into_iter().next().unwrap_or(Py::None)),
                    0 if self.pos == start + 2 || trailing_comma => Ok(Py::Tuple(items)),
                    _ => Ok(Py::Tuple(items)),
                }
            }
            '\'' | '"' => self.string(false),
            'u' | 'U' | 'b' | 'B' if matches!(self.chars.get(self.pos + 1), Some('\'' | '"')) => {
                self.pos += 1;
                self.string(false)
            }
            'r' | 'R' if matches!(self.chars.get(self.pos + 1), Some('\'' | '"')) => {
                self.pos += 1;
                self.string(true)
            }
            '-' | '+' | '.' | '0'..='9' => self.number(),
            _ if c.is_alphabetic() || c == '_' => {
                let start = self.pos;
                let word = self.name()?;
                match word.as_str() {
                    "None" => Ok(Py::None),
                    "True" => Ok(Py::Bool(true)),
                    "False" => Ok(Py::Bool(false)),
                    _ => {
                        self.pos = start;
                        Err(self.error(format!("`{word}` is not a literal (nothing is evaluated)")))
                    }
                }
            }
            _ => Err(self.error(format!("unexpected '{c}'"))),
        }
    }

    fn seq(&mut self, depth: usize, close: char) -> Result<Vec<Py>, ParseError> {
        self.seq_with_comma(depth, close).map(|(v, _)| v)
    }

    /// Items up to `close` (after the opening bracket); whether a comma
    /// followed the last one.
    fn seq_with_comma(&mut self, depth: usize, close: char) -> Result<(Vec<Py>, bool), ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        let mut comma = false;
        loop {
            self.skip_space(true);
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok((items, comma));
            }
            items.push(self.value(depth + 1, true)?);
            self.skip_space(true);
            match self.peek() {
                Some(',') => {
                    self.pos += 1;
                    comma = true;
                }
                Some(c) if c == close => comma = false,
                _ => return Err(self.error(format!("expected ',' or '{close}'"))),
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Py, ParseError> {
        self.pos += 1;
        let mut kv = Vec::new();
        loop {
            self.skip_space(true);
            if self.peek() == Some('}') {
                self.pos += 1;
                return Ok(Py::Dict(kv));
            }
            let k = self.value(depth + 1, true)?;
            self.expect(':', true)?;
            let v = self.value(depth + 1, true)?;
            kv.push((k, v));
            self.skip_space(true);
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn number(&mut self) -> Result<Py, ParseError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_')) {
            // A sign only at the start or after an exponent.
            let c = self.chars[self.pos];
            if matches!(c, '+' | '-') && self.pos > start && !matches!(self.chars[self.pos - 1], 'e' | 'E') {
                break;
            }
            self.pos += 1;
        }
        let text: String = self.chars[start..self.pos].iter().filter(|c| **c != '_').collect();
        if let Ok(n) = text.parse::<i64>() {
            return Ok(Py::Int(n));
        }
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Py::Float(x)),
            _ => {
                self.pos = start;
                Err(self.error(format!("'{text}' is not a number")))
            }
        }
    }

    fn string(&mut self, raw: bool) -> Result<Py, ParseError> {
        let quote = self.chars[self.pos];
        self.pos += 1;
        let mut s = String::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.error("a string is not closed")) };
            self.pos += 1;
            match c {
                '\n' => {
                    self.pos -= 1;
                    return Err(self.error("a string is not closed on its line"));
                }
                c if c == quote => return Ok(Py::Str(s)),
                '\\' if raw => {
                    s.push('\\');
                    if let Some(n) = self.peek() {
                        s.push(n);
                        self.pos += 1;
                    }
                }
                '\\' => self.escape(&mut s)?,
                c => s.push(c),
            }
        }
    }

    fn escape(&mut self, s: &mut String) -> Result<(), ParseError> {
        let Some(c) = self.peek() else { return Err(self.error("a string ends in a backslash")) };
        self.pos += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char, ParseError> {
            let digits: String = p.chars.get(p.pos..p.pos + n).unwrap_or_default().iter().collect();
            let ch = u32::from_str_radix(&digits, 16).ok().filter(|_| digits.len() == n).and_then(char::from_u32);
            p.pos += n;
            ch.ok_or_else(|| p.error("a malformed escape"))
        };
        match c {
            '\n' => {}
            '\\' | '\'' | '"' => s.push(c),
            'n' => s.push('\n'),
            't' => s.push('\t'),
            'r' => s.push('\r'),
            '0' => s.push('\0'),
            'x' => s.push(hex(self, 2)?),
            'u' => s.push(hex(self, 4)?),
            'U' => s.push(hex(self, 8)?),
            other => {
                // Python keeps unknown escapes as they are.
                s.push('\\');
                s.push(other);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_what_the_gui_writes() {
        let text = "# Written by Checkmk store\n\nsites.update({'remote1': {'socket': ('tcp', {'address': ('10.0.0.2', 6557), 'tls': ('encrypted', {'verify': True})}), 'channels': 7, 'heartbeat': (5, 2.0), 'cache': False, 'x': None, 'l': [1, -2, 3.5e1,], 'e': (), 'one': (1,)}})\n";
        let st = parse(text).unwrap();
        let [Statement::Update(name, v)] = st.as_slice() else { panic!("{st:?}") };
        assert_eq!(name, "sites");
        let r = v.get("remote1").unwrap();
        assert_eq!(r.get("channels"), Some(&Py::Int(7)));
        assert_eq!(r.get("heartbeat"), Some(&Py::Tuple(vec![Py::Int(5), Py::Float(2.0)])));
        assert_eq!(r.get("cache"), Some(&Py::Bool(false)));
        assert_eq!(r.get("x"), Some(&Py::None));
        assert_eq!(r.get("l"), Some(&Py::List(vec![Py::Int(1), Py::Int(-2), Py::Float(35.0)])));
        assert_eq!(r.get("e"), Some(&Py::Tuple(vec![])));
        assert_eq!(r.get("one"), Some(&Py::Tuple(vec![Py::Int(1)])));
        let sock = r.get("socket").unwrap().items().unwrap();
        assert_eq!(sock[0], Py::Str("tcp".into()));
    }

    #[test]
    fn strings_assignments_and_comments() {
        let text = "sites = {\n  \"a\\\"b\": u'it\\'s', # a comment\n  'h': '\\x41\\u00e9\\n', 'r': r'\\d',\n}\nsites['c'] = {}\n";
        let st = parse(text).unwrap();
        let Statement::Assign(_, v) = &st[0] else { panic!() };
        assert_eq!(v.get("a\"b"), Some(&Py::Str("it's".into())));
        assert_eq!(v.get("h"), Some(&Py::Str("A\u{e9}\n".into())));
        assert_eq!(v.get("r"), Some(&Py::Str("\\d".into())));
        assert_eq!(st[1], Statement::SetItem("sites".into(), Py::Str("c".into()), Py::Dict(vec![])));
    }

    #[test]
    fn what_is_not_a_literal_is_an_error_with_line_and_column() {
        for (text, line, column, what) in [
            ("sites.update({'a': 1)\n", 1, 21, "expected ',' or '}'"),
            ("\nsites = {'a': __import__('os')}", 2, 15, "is not a literal"),
            ("sites = {'a': 'open", 1, 20, "not closed"),
            ("sites.append(1)", 1, 13, "only `sites.update(...)`"),
            ("print('x')", 1, 6, "expected `print = ...`"),
            ("sites = {'a': 1} x", 1, 18, "unexpected 'x'"),
            ("sites = 1.2.3", 1, 9, "is not a number"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.what.contains(what), "{text:?}: {e}");
            assert_eq!((e.line, e.column), (line, column), "{text:?}: {e}");
        }
        let deep = format!("x = {}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse(&deep).unwrap_err().what.contains("nested deeper"));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn arbitrary_bracket_soup_never_panics(text in "[\\[\\](){}'\",:=a-z0-9 .\\\\#\n-]{0,120}") {
            let _ = parse(&text);
        }
    }
}
