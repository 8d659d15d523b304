//! A positioned YAML tree for admission, built from `saphyr-parser` events under strict limits.
//!
//! Admission needs the line and column of every node, and must refuse hostile input before
//! doing anything expensive with it, so this module does not go through serde. It streams parser
//! events into a small tree and stops at the first limit crossed:
//!
//! - input larger than [`SOURCE_BYTES_MAX`] is refused before the parser sees a byte;
//! - nesting deeper than [`NESTING_DEPTH_MAX`] is refused as soon as it is opened;
//! - anchors and aliases are refused (no alias expansion, hence no "billion laughs");
//! - exactly one document is accepted.
//!
//! Duplicate keys, tags and non-scalar keys are reported too, but they do not stop the parse, so
//! the caller can report them together with everything else.
//!
//! Scalars are not typed here: the consumer decides what a field means. A plain scalar keeps its
//! text and is marked [`ScalarStyle::Plain`]; quoted and block scalars are always strings. Keys
//! are kept as strings whatever their style, so a bare `on` key stays `"on"` (YAML 1.1 parsers,
//! kubectl's among them, read it as the boolean `true`).

use std::collections::HashSet;

use saphyr_parser::{Event, Parser, Span};

/// Inputs larger than this many bytes are refused before parsing.
pub(crate) const SOURCE_BYTES_MAX: usize = 1024 * 1024;
/// Mappings and sequences may nest this deep, no deeper.
pub(crate) const NESTING_DEPTH_MAX: usize = 64;

/// A 1-based line and column (the column counts characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub(crate) line: u32,
    pub(crate) column: u32,
}

impl Pos {
    fn of(span: Span) -> Pos {
        let line = u32::try_from(span.start.line()).unwrap_or(u32::MAX).max(1);
        let column = u32::try_from(span.start.col())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1);
        Pos { line, column }
    }
}

/// How a scalar was written: plain scalars may be typed (bool, number, null), others are strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScalarStyle {
    Plain,
    /// Single- or double-quoted, literal (`|`) or folded (`>`).
    Quoted,
}

/// One node of the tree and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) pos: Pos,
    pub(crate) kind: NodeKind,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NodeKind {
    /// Entries in source order; keys are unique (later duplicates are dropped and reported).
    Mapping(Vec<Entry>),
    Sequence(Vec<Node>),
    Scalar {
        text: String,
        style: ScalarStyle,
    },
}

/// One `key: value` entry of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_pos: Pos,
    pub(crate) value: Node,
}

impl Node {
    /// A short name of the node's kind for messages ("a mapping", "a string"...).
    pub(crate) fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Mapping(_) => "a mapping",
            NodeKind::Sequence(_) => "a list",
            NodeKind::Scalar { text, style } => match (style, Scalar::classify(text, *style)) {
                (ScalarStyle::Quoted, _) => "a string",
                (ScalarStyle::Plain, Scalar::Null) => "null",
                (ScalarStyle::Plain, Scalar::Bool(_)) => "a boolean",
                (ScalarStyle::Plain, Scalar::Int(_)) => "an integer",
                (ScalarStyle::Plain, Scalar::Float(_)) => "a number",
                (ScalarStyle::Plain, Scalar::Str) => "a string",
            },
        }
    }
}

/// The YAML 1.2 core-schema reading of a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

impl Scalar {
    /// Types a scalar by the YAML 1.2 core schema; quoted scalars are always strings.
    pub(crate) fn classify(text: &str, style: ScalarStyle) -> Scalar {
        if style == ScalarStyle::Quoted {
            return Scalar::Str;
        }
        match text {
            "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
            "true" | "True" | "TRUE" => return Scalar::Bool(true),
            "false" | "False" | "FALSE" => return Scalar::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
                return Scalar::Float(f64::INFINITY);
            }
            "-.inf" | "-.Inf" | "-.INF" => return Scalar::Float(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => return Scalar::Float(f64::NAN),
            _ => {}
        }
        if let Some(int) = parse_int(text) {
            return Scalar::Int(int);
        }
        if is_float(text)
            && let Ok(float) = text.parse::<f64>()
        {
            return Scalar::Float(float);
        }
        Scalar::Str
    }
}

/// `[-+]?[0-9]+`, `0o[0-7]+` or `0x[0-9a-fA-F]+`; values beyond `i128` are not integers.
fn parse_int(text: &str) -> Option<i128> {
    if let Some(octal) = text.strip_prefix("0o") {
        return digits_only(octal, 8).then(|| i128::from_str_radix(octal, 8).ok())?;
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return digits_only(hex, 16).then(|| i128::from_str_radix(hex, 16).ok())?;
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits_only(unsigned, 10) {
        return None;
    }
    // An integer too large for i128 is still an integer: saturate so it is reported as too large.
    Some(text.parse::<i128>().unwrap_or(if text.starts_with('-') {
        i128::MIN
    } else {
        i128::MAX
    }))
}

fn digits_only(text: &str, radix: u32) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_digit(radix))
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_float(text: &str) -> bool {
    let text = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            (whole.is_empty() || digits_only(whole, 10))
                && (fraction.is_empty() || digits_only(fraction, 10))
                && !(whole.is_empty() && fraction.is_empty())
        }
        None => digits_only(mantissa, 10),
    };
    let exponent_ok =
        exponent.is_none_or(|e| digits_only(e.strip_prefix(['-', '+']).unwrap_or(e), 10));
    mantissa_ok && exponent_ok
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlProblem {
    pub(crate) code: &'static str,
    pub(crate) path: String,
    pub(crate) pos: Option<Pos>,
    pub(crate) message: String,
}

/// The outcome of [`parse`]: the tree, unless a fatal problem stopped the parse, and every problem.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) root: Option<Node>,
    pub(crate) problems: Vec<YamlProblem>,
}

/// Stable codes of the problems this module reports.
pub(crate) mod codes {
    pub(crate) const TOO_LARGE: &str = "yaml-too-large";
    pub(crate) const TOO_DEEP: &str = "yaml-too-deep";
    pub(crate) const ANCHOR: &str = "yaml-anchor";
    pub(crate) const TAG: &str = "yaml-tag";
    pub(crate) const MULTIPLE_DOCUMENTS: &str = "yaml-multiple-documents";
    pub(crate) const EMPTY: &str = "yaml-empty";
    pub(crate) const SYNTAX: &str = "yaml-syntax";
    pub(crate) const DUPLICATE_KEY: &str = "duplicate-key";
    pub(crate) const INVALID_KEY: &str = "invalid-key";
}

/// `parent.key`, or `parent["key"]` when the key is not a plain word.
pub(crate) fn path_key(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 128
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{}]", quote_key(key)),
    }
}

/// `parent[index]`.
pub(crate) fn path_index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// A key as a JSON-style quoted string, cut to a readable length.
fn quote_key(key: &str) -> String {
    const KEY_CHARS_SHOWN_MAX: usize = 64;
    let mut quoted = String::from("\"");
    for (n, c) in key.chars().enumerate() {
        if n == KEY_CHARS_SHOWN_MAX {
            quoted.push('…');
            break;
        }
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// A collection being filled while its events stream in.
struct Frame {
    pos: Pos,
    path: String,
    body: FrameBody,
}

enum FrameBody {
    Sequence(Vec<Node>),
    Mapping {
        entries: Vec<Entry>,
        keys: HashSet<String>,
        /// The key read and waiting for its value; `None` inside means the key was invalid.
        pending_key: Option<Option<(String, Pos)>>,
    },
}

impl Frame {
    /// The path of the next child of this collection.
    fn child_path(&self) -> String {
        match &self.body {
            FrameBody::Sequence(items) => path_index(&self.path, items.len()),
            FrameBody::Mapping { pending_key, .. } => match pending_key {
                Some(Some((key, _))) => path_key(&self.path, key),
                // a key itself, or the value of an invalid key: the mapping is the best we have
                _ => self.path.clone(),
            },
        }
    }
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    problems: Vec<YamlProblem>,
}

impl Builder {
    fn child_path(&self) -> String {
        self.stack.last().map(Frame::child_path).unwrap_or_default()
    }

    /// Adds a finished node to the collection on top of the stack, or makes it the root.
    fn add(&mut self, node: Node) {
        let Some(frame) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match &mut frame.body {
            FrameBody::Sequence(items) => items.push(node),
            FrameBody::Mapping {
                entries,
                keys,
                pending_key,
            } => match pending_key.take() {
                None => match node.kind {
                    NodeKind::Scalar { text, .. } => *pending_key = Some(Some((text, node.pos))),
                    NodeKind::Mapping(_) | NodeKind::Sequence(_) => {
                        self.problems.push(YamlProblem {
                            code: codes::INVALID_KEY,
                            path: frame.path.clone(),
                            pos: Some(node.pos),
                            message: format!(
                                "mapping keys must be strings, found {}",
                                node.describe()
                            ),
                        });
                        *pending_key = Some(None);
                    }
                },
                Some(None) => {}
                Some(Some((key, key_pos))) => {
                    if keys.contains(&key) {
                        let first = entries
                            .iter()
                            .find(|entry| entry.key == key)
                            .map(|e| e.key_pos);
                        let first = first
                            .map(|p| {
                                format!(" (first defined at line {}, column {})", p.line, p.column)
                            })
                            .unwrap_or_default();
                        self.problems.push(YamlProblem {
                            code: codes::DUPLICATE_KEY,
                            path: path_key(&frame.path, &key),
                            pos: Some(key_pos),
                            message: format!("duplicate key `{key}`{first}"),
                        });
                    } else {
                        keys.insert(key.clone());
                        entries.push(Entry {
                            key,
                            key_pos,
                            value: node,
                        });
                    }
                }
            },
        }
    }

    fn open(&mut self, pos: Pos, body: FrameBody) -> Result<(), YamlProblem> {
        let path = self.child_path();
        if self.stack.len() >= NESTING_DEPTH_MAX {
            return Err(YamlProblem {
                code: codes::TOO_DEEP,
                path,
                pos: Some(pos),
                message: format!(
                    "YAML nesting is deeper than {NESTING_DEPTH_MAX} levels of mappings and lists"
                ),
            });
        }
        self.stack.push(Frame { pos, path, body });
        Ok(())
    }

    fn close(&mut self) {
        if let Some(frame) = self.stack.pop() {
            let kind = match frame.body {
                FrameBody::Sequence(items) => NodeKind::Sequence(items),
                FrameBody::Mapping { entries, .. } => NodeKind::Mapping(entries),
            };
            self.add(Node {
                pos: frame.pos,
                kind,
            });
        }
    }

    /// Reports anchors (fatal) and tags (not fatal) on a node.
    fn check_properties(
        &mut self,
        anchor_id: usize,
        has_tag: bool,
        pos: Pos,
    ) -> Result<(), YamlProblem> {
        if anchor_id != 0 {
            return Err(anchor_problem(self.child_path(), pos));
        }
        if has_tag {
            self.problems.push(YamlProblem {
                code: codes::TAG,
                path: self.child_path(),
                pos: Some(pos),
                message: "YAML tags (`!tag`, `!!str`...) are not allowed".to_owned(),
            });
        }
        Ok(())
    }
}

fn anchor_problem(path: String, pos: Pos) -> YamlProblem {
    YamlProblem {
        code: codes::ANCHOR,
        path,
        pos: Some(pos),
        message: "YAML anchors and aliases are not allowed".to_owned(),
    }
}

/// Parses one YAML document into a positioned tree, enforcing the limits described above.
pub(crate) fn parse(source: &str) -> Parsed {
    if source.len() > SOURCE_BYTES_MAX {
        return Parsed {
            root: None,
            problems: vec![YamlProblem {
                code: codes::TOO_LARGE,
                path: String::new(),
                pos: None,
                message: format!(
                    "the document is {} bytes; the limit is {SOURCE_BYTES_MAX} bytes (1 MiB)",
                    source.len()
                ),
            }],
        };
    }
    let mut builder = Builder {
        stack: Vec::new(),
        root: None,
        problems: Vec::new(),
    };
    match build(&mut builder, source) {
        Ok(()) => {}
        Err(fatal) => {
            builder.problems.push(fatal);
            return Parsed {
                root: None,
                problems: builder.problems,
            };
        }
    }
    if builder.root.is_none() {
        builder.problems.push(YamlProblem {
            code: codes::EMPTY,
            path: String::new(),
            pos: None,
            message: "the document is empty".to_owned(),
        });
    }
    Parsed {
        root: builder.root,
        problems: builder.problems,
    }
}

fn build(builder: &mut Builder, source: &str) -> Result<(), YamlProblem> {
    let mut n_documents = 0_usize;
    for event in Parser::new_from_str(source) {
        let (event, span) = event.map_err(|error| YamlProblem {
            code: codes::SYNTAX,
            path: builder.child_path(),
            pos: Some(Pos::of(Span::empty(*error.marker()))),
            message: format!("invalid YAML: {}", error.info()),
        })?;
        let pos = Pos::of(span);
        match event {
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                n_documents += 1;
                if n_documents > 1 {
                    return Err(YamlProblem {
                        code: codes::MULTIPLE_DOCUMENTS,
                        path: String::new(),
                        pos: Some(pos),
                        message: "only one YAML document is allowed; found a second one (`---`)"
                            .to_owned(),
                    });
                }
            }
            Event::Alias(_) => return Err(anchor_problem(builder.child_path(), pos)),
            Event::Scalar(text, style, anchor_id, tag) => {
                builder.check_properties(anchor_id, tag.is_some(), pos)?;
                let style = match style {
                    saphyr_parser::ScalarStyle::Plain => ScalarStyle::Plain,
                    _ => ScalarStyle::Quoted,
                };
                builder.add(Node {
                    pos,
                    kind: NodeKind::Scalar {
                        text: text.into_owned(),
                        style,
                    },
                });
            }
            Event::SequenceStart(anchor_id, tag) => {
                builder.check_properties(anchor_id, tag.is_some(), pos)?;
                builder.open(pos, FrameBody::Sequence(Vec::new()))?;
            }
            Event::MappingStart(anchor_id, tag) => {
                builder.check_properties(anchor_id, tag.is_some(), pos)?;
                builder.open(
                    pos,
                    FrameBody::Mapping {
                        entries: Vec::new(),
                        keys: HashSet::new(),
                        pending_key: None,
                    },
                )?;
            }
            Event::SequenceEnd | Event::MappingEnd => builder.close(),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(text: &str) -> Scalar {
        Scalar::classify(text, ScalarStyle::Plain)
    }

    #[test]
    fn core_schema_scalars() {
        assert_eq!(scalar("30"), Scalar::Int(30));
        assert_eq!(scalar("-7"), Scalar::Int(-7));
        assert_eq!(scalar("0x1f"), Scalar::Int(31));
        assert_eq!(scalar("0o17"), Scalar::Int(15));
        assert_eq!(scalar("1.5"), Scalar::Float(1.5));
        assert_eq!(scalar("2e3"), Scalar::Float(2000.0));
        assert_eq!(scalar(".5"), Scalar::Float(0.5));
        assert_eq!(scalar("."), Scalar::Str);
        assert_eq!(scalar("true"), Scalar::Bool(true));
        assert_eq!(scalar("on"), Scalar::Str);
        assert_eq!(scalar("~"), Scalar::Null);
        assert_eq!(scalar(""), Scalar::Null);
        assert_eq!(scalar("1_000"), Scalar::Str);
        assert_eq!(Scalar::classify("30", ScalarStyle::Quoted), Scalar::Str);
        assert_eq!(
            scalar("99999999999999999999999999999999999999999999"),
            Scalar::Int(i128::MAX)
        );
    }

    #[test]
    fn positions_and_keys() {
        let parsed = parse("a: 1\nb:\n  - x\n  - {c: d}\n");
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let Some(Node {
            kind: NodeKind::Mapping(entries),
            ..
        }) = parsed.root
        else {
            panic!("root is not a mapping");
        };
        assert_eq!(entries[1].key, "b");
        assert_eq!(entries[1].key_pos, Pos { line: 2, column: 1 });
        let NodeKind::Sequence(items) = &entries[1].value.kind else {
            panic!("b is not a list");
        };
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
    }

    #[test]
    fn duplicate_keys_are_reported_with_their_path() {
        let parsed = parse("a:\n  b: 1\n  b: 2\n");
        assert!(parsed.root.is_some());
        assert_eq!(parsed.problems.len(), 1);
        assert_eq!(parsed.problems[0].code, codes::DUPLICATE_KEY);
        assert_eq!(parsed.problems[0].path, "a.b");
        assert_eq!(parsed.problems[0].pos, Some(Pos { line: 3, column: 3 }));
    }

    #[test]
    fn paths_quote_odd_keys() {
        assert_eq!(
            path_key("metadata.labels", "app.kubernetes.io/name"),
            "metadata.labels[\"app.kubernetes.io/name\"]"
        );
        assert_eq!(path_key("", "spec"), "spec");
    }
}
