//! The subset of the IoT Hub query language the emulator understands (reference §5).
//!
//! Exists so the broker's query
//! `SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '<iso>'` is parsed
//! and evaluated for real, and anything outside the subset is refused with a 400 naming the
//! unsupported part (rather than silently matching everything).
//!
//! Grammar (keywords case-insensitive):
//! ```text
//! query := SELECT * FROM devices [WHERE expr]
//! expr  := term (OR term)*
//! term  := factor (AND factor)*
//! factor:= '(' expr ')' | path op literal
//! op    := = | != | <> | < | <= | > | >=
//! literal := 'single-quoted string' (\' and \\ escapes) | number | true | false
//! ```
//! Semantics: a path that is missing, or a comparison between different types, is false
//! (undefined), as in IoT Hub's SQL dialect. Strings compare ordinally, so ISO timestamps
//! compare chronologically.

use serde_json::Value;

/// Maximum query length accepted by IoT Hub.
pub const MAX_QUERY_LEN: usize = 8192;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// A literal on the right of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A string.
    Str(String),
    /// A number.
    Num(f64),
    /// A boolean.
    Bool(bool),
}

/// A WHERE condition tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `path op literal`
    Cmp(Vec<String>, Op, Literal),
    /// `a AND b`
    And(Box<Cond>, Box<Cond>),
    /// `a OR b`
    Or(Box<Cond>, Box<Cond>),
}

/// A parsed `SELECT * FROM devices [WHERE ...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The filter; `None` selects every device.
    pub filter: Option<Cond>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(f64),
    Op(Op),
    Star,
    LParen,
    RParen,
    Other(char),
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => w.clone(),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Num(n) => n.to_string(),
        Tok::Op(o) => format!("{o:?}"),
        Tok::Star => "*".into(),
        Tok::LParen => "(".into(),
        Tok::RParen => ")".into(),
        Tok::Other(c) => c.to_string(),
    }
}

fn tokenize(q: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = q.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string literal".into()),
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some(e @ ('\'' | '\\')) => s.push(*e),
                            _ => return Err(
                                "unsupported escape sequence in string literal (only \\' and \\\\)"
                                    .into(),
                            ),
                        }
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit() || matches!(chars[i], '.' | 'e' | 'E'))
                || (i < chars.len()
                    && matches!(chars[i], '+' | '-')
                    && matches!(chars[i - 1], 'e' | 'E'))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n: f64 = text
                .parse()
                .map_err(|_| format!("invalid number '{text}'"))?;
            out.push(Tok::Num(n));
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '$' | '.' | '-'))
            {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let (tok, len) = match two.as_str() {
                "!=" | "<>" => (Tok::Op(Op::Ne), 2),
                "<=" => (Tok::Op(Op::Le), 2),
                ">=" => (Tok::Op(Op::Ge), 2),
                _ => match c {
                    '=' => (Tok::Op(Op::Eq), 1),
                    '<' => (Tok::Op(Op::Lt), 1),
                    '>' => (Tok::Op(Op::Gt), 1),
                    '*' => (Tok::Star, 1),
                    '(' => (Tok::LParen, 1),
                    ')' => (Tok::RParen, 1),
                    '"' => {
                        return Err(
                            "double-quoted strings are not supported; use single quotes".into()
                        );
                    }
                    other => (Tok::Other(other), 1),
                },
            };
            out.push(tok);
            i += len;
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), String> {
        match self.next() {
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw) => Ok(()),
            Some(t) => Err(format!(
                "expected {kw} but found '{}' (unsupported query syntax)",
                describe(&t)
            )),
            None => Err(format!("expected {kw} but the query ended")),
        }
    }

    fn expr(&mut self) -> Result<Cond, String> {
        let mut left = self.term()?;
        while self.is_kw("OR") {
            self.pos += 1;
            let right = self.term()?;
            left = Cond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Cond, String> {
        let mut left = self.factor()?;
        while self.is_kw("AND") {
            self.pos += 1;
            let right = self.factor()?;
            left = Cond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn factor(&mut self) -> Result<Cond, String> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Tok::Word(w)) => {
                for kw in [
                    "NOT",
                    "IS_DEFINED",
                    "IS_OBJECT",
                    "STARTSWITH",
                    "ENDSWITH",
                    "CONTAINS",
                ] {
                    if w.eq_ignore_ascii_case(kw) {
                        return Err(format!("unsupported operator or function '{w}'"));
                    }
                }
                let path = parse_path(&w)?;
                let op = match self.next() {
                    Some(Tok::Op(op)) => op,
                    Some(Tok::Word(k))
                        if ["IN", "NIN", "LIKE", "IS", "BETWEEN"]
                            .iter()
                            .any(|x| k.eq_ignore_ascii_case(x)) =>
                    {
                        return Err(format!("unsupported operator '{k}'"));
                    }
                    Some(t) => {
                        return Err(format!(
                            "expected a comparison operator after '{w}', found '{}'",
                            describe(&t)
                        ));
                    }
                    None => return Err(format!("expected a comparison operator after '{w}'")),
                };
                let lit = match self.next() {
                    Some(Tok::Str(s)) => Literal::Str(s),
                    Some(Tok::Num(n)) => Literal::Num(n),
                    Some(Tok::Word(b)) if b.eq_ignore_ascii_case("true") => Literal::Bool(true),
                    Some(Tok::Word(b)) if b.eq_ignore_ascii_case("false") => Literal::Bool(false),
                    Some(t) => {
                        return Err(format!(
                            "unsupported right-hand side '{}' (only string, number or boolean literals)",
                            describe(&t)
                        ));
                    }
                    None => return Err("the query ended before a literal".into()),
                };
                Ok(Cond::Cmp(path, op, lit))
            }
            Some(t) => Err(format!("unexpected '{}' in WHERE clause", describe(&t))),
            None => Err("the WHERE clause is empty".into()),
        }
    }
}

fn parse_path(w: &str) -> Result<Vec<String>, String> {
    let segs: Vec<String> = w.split('.').map(str::to_string).collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(format!("invalid property path '{w}'"));
    }
    Ok(segs)
}

/// Parses a query; the error text names the unsupported or malformed part.
pub fn parse(q: &str) -> Result<Query, String> {
    if q.len() > MAX_QUERY_LEN {
        return Err(format!(
            "the query is {} characters; the maximum is {MAX_QUERY_LEN}",
            q.len()
        ));
    }
    let toks = tokenize(q)?;
    let mut p = Parser { toks, pos: 0 };
    p.expect_kw("SELECT")?;
    match p.next() {
        Some(Tok::Star) => {}
        Some(t) => {
            return Err(format!(
                "unsupported projection '{}': only SELECT * is supported",
                describe(&t)
            ));
        }
        None => return Err("the query ended after SELECT".into()),
    }
    p.expect_kw("FROM")?;
    match p.next() {
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("devices") => {}
        Some(t) => {
            return Err(format!(
                "unsupported collection '{}': only FROM devices is supported",
                describe(&t)
            ));
        }
        None => return Err("the query ended after FROM".into()),
    }
    let filter = match p.next() {
        None => None,
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("WHERE") => Some(p.expr()?),
        Some(t) => {
            return Err(format!(
                "unsupported clause '{}' after FROM devices",
                describe(&t)
            ));
        }
    };
    if let Some(t) = p.peek() {
        return Err(format!("unsupported trailing '{}'", describe(t)));
    }
    Ok(Query { filter })
}

fn resolve<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, seg| v.get(seg.as_str()))
}

fn compare(v: &Value, op: Op, lit: &Literal) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (v, lit) {
        (Value::String(a), Literal::Str(b)) => Some(a.as_str().cmp(b.as_str())),
        (Value::Number(a), Literal::Num(b)) => a.as_f64().and_then(|a| a.partial_cmp(b)),
        (Value::Bool(a), Literal::Bool(b)) => match op {
            Op::Eq | Op::Ne => Some(a.cmp(b)),
            _ => None,
        },
        _ => None,
    };
    let Some(o) = ord else { return false };
    match op {
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Lt => o == Ordering::Less,
        Op::Le => o != Ordering::Greater,
        Op::Gt => o == Ordering::Greater,
        Op::Ge => o != Ordering::Less,
    }
}

impl Cond {
    /// Evaluates the condition against a twin's JSON.
    pub fn matches(&self, twin: &Value) -> bool {
        match self {
            Cond::Cmp(path, op, lit) => resolve(twin, path).is_some_and(|v| compare(v, *op, lit)),
            Cond::And(a, b) => a.matches(twin) && b.matches(twin),
            Cond::Or(a, b) => a.matches(twin) || b.matches(twin),
        }
    }
}

impl Query {
    /// True when the twin is selected.
    pub fn matches(&self, twin: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(twin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin(id: &str, reported_ts: &str, temp: f64) -> Value {
        json!({"deviceId": id, "status": "enabled", "properties": {
            "reported": {"temp": temp, "$metadata": {"$lastUpdated": reported_ts}},
            "desired": {"$metadata": {"$lastUpdated": "2026-01-01T00:00:00.0000000Z"}}}})
    }

    #[test]
    fn broker_query() {
        let q = parse("SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '2026-11-26T20:45:09.1234567Z'").unwrap();
        assert!(q.matches(&twin("a", "2026-11-26T20:45:09.1234567Z", 1.0)));
        assert!(q.matches(&twin("a", "2026-11-26T20:45:09.1234568Z", 1.0)));
        assert!(!q.matches(&twin("a", "2026-11-26T20:45:09.1234566Z", 1.0)));
        assert!(!q.matches(&json!({"deviceId": "x"})));
    }

    #[test]
    fn select_all_and_case() {
        let q = parse("select * from DEVICES").unwrap();
        assert_eq!(q.filter, None);
        assert!(q.matches(&json!({})));
    }

    #[test]
    fn and_or_precedence_and_ops() {
        let q = parse("SELECT * FROM devices WHERE deviceId = 'a' OR deviceId = 'b' AND properties.reported.temp > 5").unwrap();
        assert!(q.matches(&twin("a", "", 1.0)));
        assert!(!q.matches(&twin("b", "", 1.0)));
        assert!(q.matches(&twin("b", "", 6.0)));
        let q = parse("SELECT * FROM devices WHERE (deviceId = 'a' OR deviceId = 'b') AND properties.reported.temp <= -1.5").unwrap();
        assert!(q.matches(&twin("b", "", -2.0)));
        assert!(!q.matches(&twin("b", "", 0.0)));
        let q = parse("SELECT * FROM devices WHERE deviceId != 'a' AND deviceId <> 'c'").unwrap();
        assert!(q.matches(&twin("b", "", 0.0)));
        assert!(!q.matches(&twin("a", "", 0.0)));
        // Type mismatch is false.
        let q = parse("SELECT * FROM devices WHERE properties.reported.temp = '1'").unwrap();
        assert!(!q.matches(&twin("b", "", 1.0)));
        let q = parse("SELECT * FROM devices WHERE deviceId = 'it\\'s'").unwrap();
        assert!(q.matches(&twin("it's", "", 1.0)));
    }

    #[test]
    fn unsupported_parts_are_named() {
        let cases = [
            ("SELECT deviceId FROM devices", "projection"),
            ("SELECT TOP 5 * FROM devices", "TOP"),
            ("SELECT * FROM devices.modules", "devices.modules"),
            ("SELECT * FROM devices WHERE deviceId IN ['a']", "IN"),
            (
                "SELECT * FROM devices WHERE is_defined(tags.x)",
                "is_defined",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = \"a\"",
                "single quotes",
            ),
            ("SELECT * FROM devices GROUP BY status", "GROUP"),
            (
                "SELECT * FROM devices WHERE deviceId = 'a' ORDER BY deviceId",
                "ORDER",
            ),
            ("SELECT * FROM devices WHERE", "empty"),
            ("SELECT * FROM devices WHERE deviceId = 'a", "unterminated"),
            (
                "SELECT * FROM devices WHERE deviceId = tags.x",
                "right-hand side",
            ),
            ("DELETE FROM devices", "expected SELECT"),
        ];
        for (q, needle) in cases {
            let e = parse(q).unwrap_err();
            assert!(e.contains(needle), "{q}: {e}");
        }
        assert!(
            parse(&format!(
                "SELECT * FROM devices WHERE deviceId = '{}'",
                "a".repeat(9000)
            ))
            .is_err()
        );
    }
}
