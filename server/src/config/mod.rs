//! Limit files: loading them into the engine's [`LimitSet`], and (native format) the
//! [`Metering`] configuration: a [`PriceCatalog`](crate::engine::usage::PriceCatalog) and a
//! [`QuotaSet`](crate::engine::usage::QuotaSet).
//!
//! Three formats are read, all YAML:
//!
//! - [`Format::Native`]: Tally's own format, a map with `domains` (see [`native`] for the
//!   full syntax). Descriptor-scoped limits with rolling, fixed, calendar, first-hit and
//!   token-bucket windows; and an optional `metering` section with prices and quotas (see
//!   [`metering`]). The other two formats have no metering.
//! - [`Format::Limitador`]: Kuadrant/limitador's `limits.yaml`, a list of limits with
//!   `namespace`, `max_value`, `seconds`, CEL `conditions` and `variables` (see [`limitador`]).
//! - [`Format::Envoy`]: one envoyproxy/ratelimit config file, a map with `domain` and a tree
//!   of `descriptors` (see [`envoy`]). The tree is flattened into limits whose conditions
//!   reproduce envoyproxy/ratelimit's matching precedence exactly.
//!
//! Validation is complete at load: every string, count and window is checked against the
//! engine's bounds ([`crate::engine::limits`]), CEL is compiled, time zones are looked up, so
//! a set that loads is a set the engine accepts. A bad file gives one [`ConfigError`] naming
//! the file, the line and the field, e.g.
//!
//! ```text
//! limits.yaml: line 12: domains[0].limits[2].window: unknown unit "mins" (expected ms, s, m, h, d, w)
//! ```
//!
//! Loading never panics, whatever the bytes: the YAML parser runs under a resource budget
//! (depth, node and event counts), files are capped at [`MAX_FILE_BYTES`], and parsing runs on
//! a thread with a large stack (the YAML and CEL parsers recurse deeply).

pub mod envoy;
pub mod limitador;
pub mod metering;
pub mod native;
pub mod subscriptions;

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::str::FromStr;

use serde::de::{Deserialize, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter, Spanned};

use crate::engine::limits::{
    LimitSet, LimitSpec, MAX_LIMIT_STRING_BYTES, MAX_LIMIT_TERMS, MAX_LIMITS,
};
pub use metering::Metering;

/// Everything one limits file configures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub limits: LimitSet,
    /// Prices and quotas: the native format's `metering` section (empty for the others).
    pub metering: Metering,
}

/// Largest limits file [`load_limits_file`] reads, in bytes.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The format of a limits file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Format {
    /// Tally's own format: a map with `domains`.
    Native,
    /// Kuadrant/limitador's `limits.yaml`: a list of limits with `namespace`.
    Limitador,
    /// One envoyproxy/ratelimit config file: a map with `domain` and `descriptors`.
    Envoy,
}

impl Format {
    /// The format's name, as accepted by [`FromStr`] and `--format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Limitador => "limitador",
            Format::Envoy => "envoy",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is none of `native`, `limitador`, `envoy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown limits format {0:?} (expected native, limitador or envoy)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "native" => Ok(Format::Native),
            "limitador" => Ok(Format::Limitador),
            "envoy" => Ok(Format::Envoy),
            _ => Err(UnknownFormat(s.to_owned())),
        }
    }
}

/// Why a limits file could not be loaded.
///
/// `Display` names the file, the line when known and the field path:
/// `limits.yaml: line 12: domains[0].limits[2].window: unknown unit "mins" (...)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, is larger than [`MAX_FILE_BYTES`], or is not UTF-8.
    #[error("{origin}: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML of the expected shape: bad syntax, an unknown or missing field,
    /// a value of the wrong type, or a format that cannot be recognised.
    #[error("{}", located(.origin, *.line, .field, .message))]
    Syntax {
        origin: String,
        line: Option<u64>,
        field: String,
        message: String,
    },
    /// The file has the right shape, but a value is out of bounds or inconsistent.
    #[error("{}", located(.origin, *.line, .field, .message))]
    Invalid {
        origin: String,
        line: Option<u64>,
        field: String,
        message: String,
    },
}

fn located(origin: &str, line: Option<u64>, field: &str, message: &str) -> String {
    let mut out = format!("{origin}: ");
    if let Some(line) = line {
        out.push_str(&format!("line {line}: "));
    }
    if !field.is_empty() {
        out.push_str(field);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

impl ConfigError {
    /// The file (or origin) the error is about.
    pub fn origin(&self) -> &str {
        match self {
            ConfigError::Read { origin, .. }
            | ConfigError::Syntax { origin, .. }
            | ConfigError::Invalid { origin, .. } => origin,
        }
    }

    /// The 1-based line the error is about, when known.
    pub fn line(&self) -> Option<u64> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }

    /// The field path the error is about (`domains[0].limits[2].window`), when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { field, .. } | ConfigError::Invalid { field, .. } => {
                Some(field.as_str()).filter(|f| !f.is_empty())
            }
        }
    }
}

/// Tells the format of a limits file from its top-level shape: a list of maps with
/// `namespace` is Limitador's; a map with `domain` (and `descriptors`) is envoyproxy/ratelimit's;
/// a map with `domains` is native.
pub fn detect_format(text: &str) -> Result<Format, ConfigError> {
    on_big_stack("<input>", || detect(&Source::new(text, "<input>")))
}

/// Parses and validates a limits file's text: its limits and (native format) its metering
/// section. `format: None` detects it ([`detect_format`]); `origin` names the file in error
/// messages. A file with an error anywhere is refused whole.
///
/// Runs on a short-lived thread with a large stack (the YAML and CEL parsers recurse), so it
/// blocks the caller for the length of the parse: call it from a blocking context.
pub fn parse_config(
    text: &str,
    format: Option<Format>,
    origin: &str,
) -> Result<Config, ConfigError> {
    on_big_stack(origin, || {
        let src = Source::new(text, origin);
        let format = match format {
            Some(format) => format,
            None => detect(&src)?,
        };
        let (built, metering) = match format {
            Format::Native => native::parse(&src)?,
            Format::Limitador => (limitador::parse(&src)?, Metering::default()),
            Format::Envoy => (envoy::parse(&src)?, Metering::default()),
        };
        Ok(Config {
            limits: finish(&src, built)?,
            metering,
        })
    })
}

/// [`parse_config`]'s limits only (the whole file is still validated, metering included).
pub fn parse_limits(
    text: &str,
    format: Option<Format>,
    origin: &str,
) -> Result<LimitSet, ConfigError> {
    parse_config(text, format, origin).map(|c| c.limits)
}

/// Parses a duration as limits files write it (`500ms`, `90s`, `1m`, `24h`, `400d`, `2w`) into
/// milliseconds: longer than 0, at most ten years.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    native::parse_duration(s)
}

/// Runs `f` on a thread with a large stack, and waits for it.
///
/// Parsing recurses once per YAML nesting level (bounded at 64 by the parser's budget) and
/// once per CEL nesting level (bounded at 96 by the CEL parser), and debug builds spend over
/// 100 KiB of stack per CEL level: more than the 2 MiB a test or tokio thread has. The stack
/// is reserved address space; only what is used is committed.
fn on_big_stack<T: Send>(
    origin: &str,
    f: impl FnOnce() -> Result<T, ConfigError> + Send,
) -> Result<T, ConfigError> {
    let failed = |message: String| ConfigError::Syntax {
        origin: origin.to_owned(),
        line: None,
        field: String::new(),
        message,
    };
    // The closure sits in a slot the thread takes it from, so that it survives a failed spawn.
    let slot = std::sync::Mutex::new(Some(f));
    let run = || {
        let f = slot.lock().ok().and_then(|mut f| f.take());
        f.map(|f| f())
    };
    std::thread::scope(|scope| {
        let mut last_error = None;
        for stack in [256 << 20, 32 << 20] {
            let spawned = std::thread::Builder::new()
                .name("tally-config".to_owned())
                .stack_size(stack)
                .spawn_scoped(scope, run);
            match spawned {
                Ok(handle) => {
                    return match handle.join() {
                        Ok(Some(result)) => result,
                        Ok(None) => Err(failed("internal error: parser not run".to_owned())),
                        Err(_) => Err(failed("internal error: the parser panicked".to_owned())),
                    };
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(failed(format!(
            "cannot start a thread to parse the limits: {}",
            last_error.map_or_else(|| "unknown error".to_owned(), |e| e.to_string())
        )))
    })
}

/// [`load_config_file`]'s limits only (the whole file is still validated, metering included).
pub fn load_limits_file(
    path: &std::path::Path,
    format: Option<Format>,
) -> Result<LimitSet, ConfigError> {
    load_config_file(path, format).map(|c| c.limits)
}

/// Reads, parses and validates a limits file ([`parse_config`]). `format: None` detects it
/// ([`detect_format`]).
pub fn load_config_file(
    path: &std::path::Path,
    format: Option<Format>,
) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let read_error = |source| ConfigError::Read {
        origin: origin.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is larger than {MAX_FILE_BYTES} bytes"),
        )));
    }
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        Err(e) => {
            let at = e.valid_up_to();
            let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
            return Err(ConfigError::Syntax {
                origin,
                line: Some(line as u64),
                field: String::new(),
                message: format!("not UTF-8 text (invalid byte at offset {at})"),
            });
        }
    };
    parse_config(text, format, &origin)
}

fn detect(src: &Source<'_>) -> Result<Format, ConfigError> {
    if let Some(format) = quick_detect(src.text) {
        return Ok(format);
    }
    let root = match src.tree_result() {
        Ok(root) => root,
        Err(e) => return Err(src.yaml_error(e)),
    };
    let fail = |message: &str| ConfigError::Syntax {
        origin: src.origin.to_owned(),
        line: Some(root.line.max(1)),
        field: String::new(),
        message: format!(
            "cannot tell the limits format: {message}; expected a map with `domains` (native), \
             a list of limits with `namespace` (limitador) or a map with `domain` and \
             `descriptors` (envoy); or name the format explicitly"
        ),
    };
    match &root.kind {
        NodeKind::Map(entries) => {
            let has = |k: &str| entries.iter().any(|e| e.key == k);
            if has("domains") || has("metering") {
                Ok(Format::Native)
            } else if has("domain") {
                Ok(Format::Envoy)
            } else {
                Err(fail("the top-level map has neither `domains` nor `domain`"))
            }
        }
        NodeKind::Seq(items) => match items.first().map(|i| &i.kind) {
            None => Ok(Format::Limitador),
            Some(NodeKind::Map(entries)) if entries.iter().any(|e| e.key == "namespace") => {
                Ok(Format::Limitador)
            }
            Some(_) => Err(fail(
                "the top-level list's first item is not a map with `namespace`",
            )),
        },
        NodeKind::Scalar => Err(fail("the document is empty or a single value")),
    }
}

/// Detection from the text alone, for the usual block-style map (parsing a big file twice
/// would double its load time): the keys written at column 0. `None` when unsure.
fn quick_detect(text: &str) -> Option<Format> {
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with([' ', '\t', '#']) || line == "---" {
            continue;
        }
        let first = line.as_bytes()[0];
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        let (key, rest) = line.split_once(':')?;
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            return None;
        }
        keys.push(key.trim_end());
    }
    if keys.contains(&"domains") || keys.contains(&"metering") {
        Some(Format::Native)
    } else if keys.contains(&"domain") {
        Some(Format::Envoy)
    } else {
        None
    }
}

/// Set-wide checks: the number of limits, names unique per domain, `replaces` targets.
fn finish(src: &Source<'_>, built: Vec<Built>) -> Result<LimitSet, ConfigError> {
    if built.len() > MAX_LIMITS {
        return Err(src.invalid(
            &built[MAX_LIMITS].path,
            format!("more than {MAX_LIMITS} limits in one set"),
        ));
    }
    let mut names: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, b) in built.iter().enumerate() {
        if b.spec.name.is_empty() {
            continue;
        }
        if let Some(first) = names.insert((&b.spec.domain, &b.spec.name), i) {
            return Err(src.invalid(
                &b.name_path,
                format!(
                    "name {} is already used by {} in domain {}",
                    show(&b.spec.name),
                    src.describe(&built[first].path),
                    show(&b.spec.domain)
                ),
            ));
        }
    }
    for b in &built {
        if b.spec.replaces.len() > MAX_LIMIT_TERMS {
            return Err(src.invalid(
                &b.replaces_path,
                format!("more than {MAX_LIMIT_TERMS} entries"),
            ));
        }
        for (k, target) in b.spec.replaces.iter().enumerate() {
            let path = b.replaces_path.index(k);
            let path = match b.replaces_field {
                Some(field) => path.key(field),
                None => path,
            };
            check_string(src, &path, target, true)?;
            if *target == b.spec.name {
                return Err(src.invalid(&path, "a limit cannot replace itself".to_owned()));
            }
            if b.replaces_must_exist && !names.contains_key(&(b.spec.domain.as_str(), target)) {
                return Err(src.invalid(
                    &path,
                    format!(
                        "no limit named {} in domain {}",
                        show(target),
                        show(&b.spec.domain)
                    ),
                ));
            }
        }
    }
    Ok(LimitSet {
        limits: built.into_iter().map(|b| b.spec).collect(),
    })
}

/// A limit built by a format module, with where it came from for set-wide messages.
pub(crate) struct Built {
    pub spec: LimitSpec,
    /// The limit's own node (`domains[0].limits[2]`).
    pub path: FieldPath,
    /// Where its name is written (or the limit's path when the name is generated).
    pub name_path: FieldPath,
    /// The `replaces` list.
    pub replaces_path: FieldPath,
    /// The field inside each `replaces` item holding the name (envoy: `name`), if any.
    pub replaces_field: Option<&'static str>,
    /// Whether every `replaces` target must name a limit of the same domain.
    pub replaces_must_exist: bool,
}

// ---------------------------------------------------------------------------------------------
// Field paths.

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Where a value sits in the document: `domains[0].limits[2].window`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldPath(Vec<Seg>);

impl FieldPath {
    pub fn root() -> FieldPath {
        FieldPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_owned()));
        p
    }

    pub fn index(&self, index: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(index));
        p
    }

    fn parent(&self) -> FieldPath {
        let mut p = self.clone();
        p.0.pop();
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => {
                    let plain = !k.is_empty()
                        && k.len() <= 64
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !plain {
                        write!(f, "[{}]", show(k))?;
                    } else if i == 0 {
                        f.write_str(k)?;
                    } else {
                        write!(f, ".{k}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A user string quoted for a message: escaped, and cut to a readable length.
pub(crate) fn show(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}...", &s[..end])
    }
}

// ---------------------------------------------------------------------------------------------
// The source text, its generic tree (for lines and paths), and error construction.

/// A YAML node with its position, used only to find lines and field paths for messages.
#[derive(Debug)]
pub(crate) struct Node {
    line: u64,
    column: u64,
    kind: NodeKind,
}

#[derive(Debug)]
enum NodeKind {
    Scalar,
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug)]
struct Entry {
    key: String,
    line: u64,
    column: u64,
    value: Node,
}

/// The serde shape of [`Node`]: any YAML, with spans.
enum RawNode {
    Scalar,
    Seq(Vec<Spanned<RawNode>>),
    Map(Vec<(Spanned<String>, Spanned<RawNode>)>),
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawNode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_i128<E>(self, _: i128) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_u128<E>(self, _: u128) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_unit<E>(self) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_none<E>(self) -> Result<RawNode, E> {
                Ok(RawNode::Scalar)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawNode, D::Error> {
                RawNode::deserialize(d)
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<RawNode, D::Error> {
                RawNode::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNode, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(RawNode::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(RawNode::Map(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Node {
    fn from_raw(raw: Spanned<RawNode>) -> Node {
        let (line, column) = (raw.referenced.line(), raw.referenced.column());
        let kind = match raw.value {
            RawNode::Scalar => NodeKind::Scalar,
            RawNode::Seq(items) => NodeKind::Seq(items.into_iter().map(Node::from_raw).collect()),
            RawNode::Map(entries) => NodeKind::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| Entry {
                        line: k.referenced.line(),
                        column: k.referenced.column(),
                        key: k.value,
                        value: Node::from_raw(v),
                    })
                    .collect(),
            ),
        };
        Node { line, column, kind }
    }
}

/// Parser options: the default YAML budget, with room for [`MAX_LIMITS`] limits.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 16_000_000,
            max_nodes: 8_000_000,
        },
    }
}

/// A limits file's text and name, with a lazily parsed position tree for messages.
pub(crate) struct Source<'a> {
    pub text: &'a str,
    pub origin: &'a str,
    tree: OnceCell<Result<Node, serde_saphyr::Error>>,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str, origin: &'a str) -> Source<'a> {
        Source {
            text,
            origin,
            tree: OnceCell::new(),
        }
    }

    fn tree_result(&self) -> Result<&Node, &serde_saphyr::Error> {
        self.tree
            .get_or_init(|| {
                // Duplicate keys are kept (first wins) so their error can be given a path.
                let mut options = yaml_options();
                options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::FirstWins;
                serde_saphyr::from_str_with_options::<Spanned<RawNode>>(self.text, options)
                    .map(Node::from_raw)
            })
            .as_ref()
    }

    fn tree(&self) -> Option<&Node> {
        self.tree_result().ok()
    }

    /// Deserializes the whole text as `T`, turning YAML errors into [`ConfigError::Syntax`].
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_saphyr::from_str_with_options(self.text, yaml_options())
            .map_err(|e| self.yaml_error(&e))
    }

    /// The line of the value at `path`, or of its nearest existing ancestor.
    pub fn line_of(&self, path: &FieldPath) -> Option<u64> {
        let mut node = self.tree()?;
        let mut line = node.line;
        for seg in &path.0 {
            let next = match (seg, &node.kind) {
                (Seg::Key(k), NodeKind::Map(entries)) => {
                    entries.iter().rev().find(|e| e.key == *k).map(|e| {
                        line = e.line;
                        &e.value
                    })
                }
                (Seg::Index(i), NodeKind::Seq(items)) => items.get(*i).inspect(|item| {
                    line = item.line;
                }),
                _ => None,
            };
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        Some(line).filter(|&l| l > 0)
    }

    /// `domains[0].limits[1] (line 7)`, for messages that point at another place.
    pub fn describe(&self, path: &FieldPath) -> String {
        match self.line_of(path) {
            Some(line) => format!("{path} (line {line})"),
            None => path.to_string(),
        }
    }

    /// The field path of the innermost node at or before `line:column`. Nodes have no end
    /// position, so a block node is left when the position is on a later line and indented
    /// less than the node.
    fn path_at(&self, line: u64, column: u64) -> FieldPath {
        let mut path = FieldPath::root();
        let Some(mut node) = self.tree() else {
            return path;
        };
        let pos = (line, column);
        let inside = |n: &Node| (n.line, n.column) <= pos && (n.line == line || column >= n.column);
        loop {
            match &node.kind {
                NodeKind::Map(entries) => {
                    let Some(e) = entries.iter().rev().find(|e| (e.line, e.column) <= pos) else {
                        break;
                    };
                    path.0.push(Seg::Key(e.key.clone()));
                    if !inside(&e.value) {
                        break;
                    }
                    node = &e.value;
                }
                NodeKind::Seq(items) => {
                    let Some((i, item)) = items
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, item)| (item.line, item.column) <= pos)
                    else {
                        break;
                    };
                    if !inside(item) {
                        break;
                    }
                    path.0.push(Seg::Index(i));
                    node = item;
                }
                NodeKind::Scalar => break,
            }
        }
        path
    }

    /// A YAML or shape error, with its line and the field path found from its position.
    pub fn yaml_error(&self, err: &serde_saphyr::Error) -> ConfigError {
        let message = clean(&yaml_message(err));
        let location = err.location().filter(|l| l.line() > 0);
        let (line, field) = match location {
            None => (None, String::new()),
            Some(l) => {
                let path = self.path_at(l.line(), l.column());
                if let serde_saphyr::Error::DuplicateMappingKey { key: Some(key), .. } =
                    err.without_snippet()
                {
                    // The tree keeps the first of the two: the position falls after it.
                    let path = path.parent().key(key);
                    (Some(l.line()), path.to_string())
                } else if message.starts_with("missing field") && !path.0.is_empty() {
                    // Reported at the map's last key: the field belongs to the map.
                    let parent = path.parent();
                    (self.line_of(&parent).or(Some(l.line())), parent.to_string())
                } else {
                    (Some(l.line()), path.to_string())
                }
            }
        };
        ConfigError::Syntax {
            origin: self.origin.to_owned(),
            line,
            field,
            message,
        }
    }

    /// A validation error at `path`, with the line found in the tree.
    pub fn invalid(&self, path: &FieldPath, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line: self.line_of(path),
            field: path.to_string(),
            message,
        }
    }
}

/// The library's message, reworded where it speaks of parser internals.
fn yaml_message(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    let err = err.without_snippet();
    match err {
        E::InvalidScalar { ty, .. } if matches!(*ty, "u8" | "u16" | "u32" | "u64" | "usize") => {
            "expected a whole number, 0 or more".to_owned()
        }
        E::InvalidScalar { ty: "bool", .. } => "expected true or false".to_owned(),
        E::Unexpected { expected, .. } => format!(
            "expected {}",
            match *expected {
                "mapping start" => "a map",
                "sequence start" => "a list",
                "string scalar" => "a string",
                other => other,
            }
        ),
        E::DuplicateMappingKey { key: Some(key), .. } => format!("duplicate key {}", show(key)),
        E::DuplicateMappingKey { key: None, .. } => "duplicate key".to_owned(),
        _ => serde_saphyr::DefaultMessageFormatter
            .format_message(err)
            .into_owned(),
    }
}

/// One line, no control characters, bounded length: safe to print and log.
fn clean(message: &str) -> String {
    const MAX: usize = 400;
    let mut out = String::with_capacity(message.len().min(MAX));
    for c in message.chars() {
        if out.len() >= MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            if c == '\n' || c == '\t' {
                out.push(' ');
            } else {
                out.extend(c.escape_debug());
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Shared checks.

/// Checks a string against [`MAX_LIMIT_STRING_BYTES`], and that it is not empty if `required`.
pub(crate) fn check_string(
    src: &Source<'_>,
    path: &FieldPath,
    s: &str,
    required: bool,
) -> Result<(), ConfigError> {
    check_string_max(src, path, s, required, MAX_LIMIT_STRING_BYTES)
}

/// Checks a string against `max` bytes, and that it is not empty if `required`.
pub(crate) fn check_string_max(
    src: &Source<'_>,
    path: &FieldPath,
    s: &str,
    required: bool,
    max: usize,
) -> Result<(), ConfigError> {
    if required && s.is_empty() {
        return Err(src.invalid(path, "must not be empty".to_owned()));
    }
    if s.len() > max {
        return Err(src.invalid(
            path,
            format!("{} bytes is longer than the {max} bytes allowed", s.len()),
        ));
    }
    Ok(())
}

/// Checks a domain or entry key: not empty, and no longer than `max` bytes (the bounds
/// requests are held to, so a limit that could never match is refused at load).
pub(crate) fn check_name(
    src: &Source<'_>,
    path: &FieldPath,
    s: &str,
    max: usize,
) -> Result<(), ConfigError> {
    check_string(src, path, s, true)?;
    if s.len() > max {
        return Err(src.invalid(
            path,
            format!("{} bytes is longer than the {max} bytes allowed", s.len()),
        ));
    }
    Ok(())
}

/// Checks a list's length against [`MAX_LIMIT_TERMS`].
pub(crate) fn check_terms(
    src: &Source<'_>,
    path: &FieldPath,
    len: usize,
) -> Result<(), ConfigError> {
    if len > MAX_LIMIT_TERMS {
        return Err(src.invalid(
            path,
            format!("{len} entries is more than the {MAX_LIMIT_TERMS} allowed"),
        ));
    }
    Ok(())
}

/// Checks that a time zone exists in the bundled database (as the engine will look it up).
pub(crate) fn check_time_zone(
    src: &Source<'_>,
    path: &FieldPath,
    name: &str,
) -> Result<(), ConfigError> {
    check_string(src, path, name, true)?;
    if name.eq_ignore_ascii_case("Etc/Unknown") {
        return Err(src.invalid(path, "Etc/Unknown is not a real time zone".to_owned()));
    }
    if jiff::tz::TimeZone::get(name).is_err() {
        return Err(src.invalid(
            path,
            format!(
                "unknown time zone {} (expected an IANA name such as UTC or Europe/Berlin)",
                show(name)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Parses `text` expecting an error; returns its message.
    pub fn err(text: &str, format: Option<Format>) -> String {
        match parse_limits(text, format, "limits.yaml") {
            Ok(set) => panic!("expected an error, got {set:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn format_names_round_trip() {
        for f in [Format::Native, Format::Limitador, Format::Envoy] {
            assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
            let v = <Format as clap::ValueEnum>::to_possible_value(&f).unwrap();
            assert_eq!(v.get_name(), f.as_str());
        }
        assert_eq!("Envoy".parse::<Format>().unwrap(), Format::Envoy);
        assert!("yaml".parse::<Format>().is_err());
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format("domains: []\n").unwrap(), Format::Native);
        assert_eq!(
            detect_format("# limits\ndomains:\n  - domain: a\n").unwrap(),
            Format::Native
        );
        assert_eq!(
            detect_format("- namespace: a\n  max_value: 1\n  seconds: 1\n").unwrap(),
            Format::Limitador
        );
        assert_eq!(detect_format("[]").unwrap(), Format::Limitador);
        assert_eq!(
            detect_format("domain: a\ndescriptors: []\n").unwrap(),
            Format::Envoy
        );
        assert_eq!(detect_format("domain: a\n").unwrap(), Format::Envoy);
        for bad in [
            "",
            "# nothing\n",
            "42",
            "foo: 1\n",
            "- 1\n- 2\n",
            "- name: x\n",
        ] {
            let e = detect_format(bad).unwrap_err().to_string();
            assert!(e.contains("cannot tell the limits format"), "{bad:?}: {e}");
            assert!(e.starts_with("<input>: line "), "{bad:?}: {e}");
        }
        // Flow style and odd layouts go through the parser.
        assert_eq!(detect_format("{ domains: [] }").unwrap(), Format::Native);
        assert_eq!(
            detect_format("--- # doc\n\"domain\": a\n").unwrap(),
            Format::Envoy
        );
        assert_eq!(
            detect_format("%YAML 1.2\n---\ndescriptors: []\ndomain: a\n").unwrap(),
            Format::Envoy
        );
        assert_eq!(
            quick_detect("descriptors:\n  - key: a\ndomain: d\n"),
            Some(Format::Envoy)
        );
        assert_eq!(
            quick_detect("domains:\n  - domain: d\n"),
            Some(Format::Native)
        );
        assert_eq!(quick_detect("- namespace: a\n"), None);
        assert_eq!(quick_detect("{ domains: [] }"), None);
        let e = detect_format("[domains\n").unwrap_err();
        assert_eq!(e.line(), Some(1), "{e}");
        let e = parse_limits("domains: [\n", None, "x").unwrap_err();
        assert_eq!(e.to_string(), "x: line 1: unclosed bracket '['");
    }

    #[test]
    fn explicit_format_overrides_detection() {
        let e = err("domains: []\n", Some(Format::Envoy));
        assert!(e.contains("unknown field `domains`"), "{e}");
        let set = parse_limits("domains: []\n", Some(Format::Native), "x").unwrap();
        assert!(set.limits.is_empty());
    }

    #[test]
    fn field_paths_display() {
        let p = FieldPath::root()
            .key("domains")
            .index(0)
            .key("match")
            .key("req.method");
        assert_eq!(p.to_string(), "domains[0].match[\"req.method\"]");
        assert_eq!(
            FieldPath::root()
                .index(3)
                .key("conditions")
                .index(1)
                .to_string(),
            "[3].conditions[1]"
        );
    }

    #[test]
    fn load_limits_file_reads_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tally-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.yaml");
        std::fs::write(
            &path,
            "domains:\n  - domain: a\n    limits:\n      - capacity: 1\n",
        )
        .unwrap();
        let e = load_limits_file(&path, None).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: line 4: domains[0].limits[0]: ",
                path.display()
            )),
            "{e}"
        );
        std::fs::write(&path, b"domains: []\n\xff\xfe").unwrap();
        let e = load_limits_file(&path, None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("not UTF-8"), "{e}");
        let e = load_limits_file(&dir.join("missing.yaml"), None).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random bytes, YAML-ish fragments, and deep nesting.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces = [
            "domains:",
            "- ",
            "domain: ",
            "limits:",
            "window: ",
            "{",
            "}",
            "[",
            "]",
            "\n",
            "  ",
            "capacity: ",
            "99999999999999999999999",
            "&a ",
            "*a",
            "<<: *a",
            "rolling: ",
            "1m",
            "match:",
            "in: ",
            "token_bucket:",
            "descriptors:",
            "key: ",
            "namespace: ",
            "conditions: ['",
            "((((((",
            "'",
            "\"",
            ":",
            ",",
            "!!binary ",
            "---\n",
            "\t",
            "é",
        ];
        for round in 0..400 {
            let mut text = String::new();
            for _ in 0..(next() % 200) {
                if round % 3 == 0 {
                    let c = char::from_u32((next() % 0x800) as u32).unwrap_or('x');
                    text.push(c);
                } else {
                    text.push_str(pieces[(next() as usize) % pieces.len()]);
                }
            }
            for format in [
                None,
                Some(Format::Native),
                Some(Format::Limitador),
                Some(Format::Envoy),
            ] {
                let _ = parse_limits(&text, format, "fuzz.yaml");
            }
        }
        let deep = "[".repeat(100_000);
        assert!(parse_limits(&deep, None, "deep.yaml").is_err());
        let deep_map = "a:\n".to_owned()
            + &(1..200)
                .map(|i| format!("{}b:\n", " ".repeat(i)))
                .collect::<String>();
        assert!(parse_limits(&deep_map, None, "deep.yaml").is_err());
        let big = "domains:\n".to_owned()
            + &"  - domain: x\n    limits: [{ capacity: 1 }]\n".repeat(20_000);
        assert!(parse_limits(&big, None, "big.yaml").is_err());
        let bytes: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        assert!(parse_limits(&text, None, "binary.bin").is_err());
    }
}
