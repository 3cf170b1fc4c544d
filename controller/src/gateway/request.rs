//! What a client's request asks for, read exactly as the upstream will read it.
//!
//! Two inputs decide where a request may go: its path (which route, which part
//! of an upstream's API) and its model (which route, which upstreams, and so
//! which regions the data reaches). Both are read here once, and whatever could
//! be read two ways is refused, so that no check passes on a reading the
//! upstream does not share:
//! - [`normalize_path`] decodes the path once, refuses every spelling that
//!   another server could decode differently (double encoding, encoded
//!   separators, dot segments, `;` parameters, NUL and control bytes, non-ASCII
//!   such as overlong UTF-8), and returns the one canonical spelling that is
//!   matched against routes and forwarded.
//! - [`read_model`] parses a JSON body strictly: a duplicate key (at any depth,
//!   compared after unescaping), a second spelling of `model` in another case,
//!   or a `model` that is not a string is an error, never a guess.
//!
//! Pure functions over bytes: no IO, no configuration; the proxy decides what
//! an error means for the request (see `proxy::handle`).

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} must start with '/'")]
    NotAbsolute(String),
    #[error("path {path:?}: {escape:?} is not a valid percent-escape (two hex digits after '%')")]
    BadEscape { path: String, escape: String },
    #[error("path {path:?}: an encoded {what} ({escape:?}) could be read two ways; send the plain character or none")]
    AmbiguousEscape {
        path: String,
        escape: String,
        what: &'static str,
    },
    #[error("path {path:?}: {what} is not allowed in a path")]
    Forbidden { path: String, what: String },
    #[error(
        "path {path:?}: the segment {segment:?} is not allowed (dot segments, empty segments)"
    )]
    Segment { path: String, segment: String },
}

/// Bytes that are sent escaped in a forwarded path: the ones RFC 3986 does not
/// allow raw in a path segment. Everything else printable goes as it is.
/// `+` too: RFC 3986 reads it as itself, form decoders as a space, but
/// every server reads `%2B` as `+`.
fn needs_escape(b: u8) -> bool {
    matches!(
        b,
        b'"' | b'<' | b'>' | b'`' | b'{' | b'}' | b'|' | b'^' | b'[' | b']' | b'+'
    )
}

/// Decodes `raw` once and returns its canonical form, or why it is refused.
/// The result is a fixed point: `normalize_path(&normalize_path(p)?) ==
/// normalize_path(p)`.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let refuse = |what: &str| PathError::Forbidden {
        path: raw.to_string(),
        what: what.to_string(),
    };
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    let bytes = raw.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        // Bytes, not a str slice: the escape may run into a multi-byte char.
        let escape = String::from_utf8_lossy(&bytes[i..(i + 3).min(bytes.len())]).into_owned();
        let value = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| PathError::BadEscape {
                path: raw.to_string(),
                escape: escape.clone(),
            })?;
        let what = match value {
            b'%' => Some("'%' (double encoding)"),
            b'/' => Some("'/'"),
            b'\\' => Some("'\\'"),
            b'.' => Some("'.'"),
            b'?' => Some("'?'"),
            b'#' => Some("'#'"),
            b';' => Some("';'"),
            _ => None,
        };
        if let Some(what) = what {
            return Err(PathError::AmbiguousEscape {
                path: raw.to_string(),
                escape: escape.to_string(),
                what,
            });
        }
        decoded.push(value);
        i += 3;
    }
    for &b in &decoded {
        match b {
            0 => return Err(refuse("NUL (%00)")),
            0x01..=0x1f | 0x7f => return Err(refuse(&format!("the control byte {b:#04x}"))),
            b' ' => return Err(refuse("a space")),
            b'\\' => return Err(refuse("'\\'")),
            b';' => return Err(refuse("';' (path parameters)")),
            0x80..=0xff => {
                return Err(refuse(
                    "a non-ASCII byte (send ASCII; overlong and other UTF-8 spellings are refused)",
                ))
            }
            _ => {}
        }
    }
    // ASCII from here on.
    let text = String::from_utf8_lossy(&decoded);
    let segments: Vec<&str> = text[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        // A trailing '/' leaves one empty last segment, which is fine. A dot
        // segment in any spelling some server reads as one is not: "..",
        // "...", "..:x" (the part before a ':'), and "x." (Windows servers
        // strip trailing dots, so "chat." is "chat" there).
        let empty_inside = seg.is_empty() && n != last;
        let stem = seg.split(':').next().unwrap_or_default();
        let dots = !seg.is_empty() && (stem.bytes().all(|b| b == b'.') || stem.ends_with('.'));
        if empty_inside || dots {
            return Err(PathError::Segment {
                path: raw.to_string(),
                segment: (*seg).to_string(),
            });
        }
    }
    let mut out = String::with_capacity(decoded.len() + 8);
    for &b in &decoded {
        if needs_escape(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    Ok(out)
}

/// Checks a query string: well-formed escapes, and no NUL or control byte
/// in it once decoded. It is forwarded as it is.
pub fn check_query(query: &str) -> Result<(), PathError> {
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = if bytes[i] == b'%' {
            let v = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PathError::BadEscape {
                    path: format!("?{query}"),
                    escape: String::from_utf8_lossy(&bytes[i..(i + 3).min(bytes.len())])
                        .into_owned(),
                })?;
            i += 3;
            v
        } else {
            i += 1;
            bytes[i - 1]
        };
        if b < 0x20 || b == 0x7f || b == b'\\' {
            return Err(PathError::Forbidden {
                path: format!("?{query}"),
                what: format!("the byte {b:#04x} in the query"),
            });
        }
    }
    Ok(())
}

/// The models a query string names (`model=` in any case), decoded.
pub fn query_models(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode_form(k);
            k.trim()
                .eq_ignore_ascii_case("model")
                .then(|| decode_form(v))
        })
        .collect()
}

fn decode_form(s: &str) -> String {
    let plus = s.replace('+', " ");
    let bytes = plus.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Path segments that name a model in the next segment, in the providers'
/// APIs: Azure OpenAI `deployments/{m}`, legacy OpenAI `engines/{m}`, Vertex
/// and Gemini `models/{m}:generateContent`, Bedrock `model/{m}/invoke`.
const MODEL_SEGMENTS: [&str; 5] = ["deployments", "engines", "models", "model", "tunedmodels"];

/// The models a (normalised) path names, in order.
pub fn path_models(path: &str) -> Vec<&str> {
    let segments: Vec<&str> = path.split('/').collect();
    segments
        .windows(2)
        .filter(|w| MODEL_SEGMENTS.iter().any(|m| w[0].eq_ignore_ascii_case(m)))
        .map(|w| w[1].split(':').next().unwrap_or_default())
        .filter(|m| !m.is_empty())
        .collect()
}

/// Why a body's model cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not valid JSON ({0}); send one JSON object in UTF-8")]
    NotJson(String),
    #[error("the body repeats the key {0:?}; send each key once")]
    DuplicateKey(String),
    #[error("the body has the key {0:?} beside or instead of \"model\"; spell it \"model\", once")]
    ModelSpelling(String),
    #[error("\"model\" is {0}, not a string; send the model's name as a string")]
    ModelNotString(&'static str),
}

/// The model a JSON body names: `Ok(None)` for an empty body, and for JSON
/// that is not an object or has no `model`.
pub fn read_model(body: &[u8]) -> Result<Option<String>, BodyError> {
    if body.is_empty() {
        return Ok(None);
    }
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let model = Strict {
        top: true,
        found: &found,
    }
    .deserialize(&mut de)
    .and_then(|m| de.end().map(|()| m));
    match (model, found.into_inner()) {
        (_, Some(e)) => Err(e),
        (Ok(m), None) => Ok(m),
        (Err(e), None) => Err(BodyError::NotJson(e.to_string())),
    }
}

/// Walks any JSON value, refusing duplicate keys; at the top level it also
/// returns the `model`. The precise refusal goes to `found`, since serde's
/// error type carries only text.
struct Strict<'a> {
    top: bool,
    found: &'a RefCell<Option<BodyError>>,
}

impl Strict<'_> {
    fn fail<E: de::Error>(&self, e: BodyError) -> E {
        let text = e.to_string();
        self.found.borrow_mut().get_or_insert(e);
        E::custom(text)
    }
    fn inner(&self) -> Strict<'_> {
        Strict {
            top: false,
            found: self.found,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Option<String>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(self.inner())?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut keys = KeySet::default();
        let mut model = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if keys.contains(&key) {
                return Err(self.fail(BodyError::DuplicateKey(key.into_owned())));
            }
            if self.top && key == "model" {
                model = Some(map.next_value_seed(ModelValue { strict: &self })?);
            } else if self.top && key.to_lowercase() == "model" {
                // Case-insensitive decoders (Go's encoding/json) read this
                // as the model; others ignore it.
                return Err(self.fail(BodyError::ModelSpelling(key.into_owned())));
            } else {
                map.next_value_seed(self.inner())?;
            }
            keys.insert(key);
        }
        Ok(model)
    }
}

/// An object key, borrowed from the body unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The keys seen in one object: a short list (most objects have a few
/// keys), a hash set past [`KeySet::FEW`], so a huge object stays linear.
enum KeySet<'de> {
    Few(Vec<Cow<'de, str>>),
    Many(HashSet<Cow<'de, str>>),
}

impl Default for KeySet<'_> {
    fn default() -> Self {
        KeySet::Few(Vec::new())
    }
}

impl<'de> KeySet<'de> {
    const FEW: usize = 16;

    fn contains(&self, k: &str) -> bool {
        match self {
            KeySet::Few(v) => v.iter().any(|x| x == k),
            KeySet::Many(h) => h.contains(k),
        }
    }

    fn insert(&mut self, k: Cow<'de, str>) {
        match self {
            KeySet::Few(v) if v.len() < Self::FEW => v.push(k),
            KeySet::Few(v) => {
                let mut h: HashSet<Cow<'de, str>> = v.drain(..).collect();
                h.insert(k);
                *self = KeySet::Many(h);
            }
            KeySet::Many(h) => {
                h.insert(k);
            }
        }
    }
}

/// The value of the top-level `model`: a string, or a refusal naming its type.
struct ModelValue<'s, 'a> {
    strict: &'s Strict<'a>,
}

impl<'de> DeserializeSeed<'de> for ModelValue<'_, '_> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ModelValue<'_, '_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Err(self.strict.fail(BodyError::ModelNotString("a boolean")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Err(self.strict.fail(BodyError::ModelNotString("a number")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Err(self.strict.fail(BodyError::ModelNotString("a number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Err(self.strict.fail(BodyError::ModelNotString("a number")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Err(self.strict.fail(BodyError::ModelNotString("null")))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.strict.fail(BodyError::ModelNotString("an array")))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.strict.fail(BodyError::ModelNotString("an object")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spelling of a climb out of the base path, or of a path another
    /// server could read differently, is refused; the plain ones come back
    /// canonical.
    #[test]
    fn traversal_encodings_are_refused() {
        let refused = [
            "/v1/../admin",
            "/v1/./x",
            "/v1/..",
            "/v1/...",
            "/v1/..;/admin",
            "/v1/..;x=1/admin",
            "/v1/chat;jsessionid=1",
            "//169.254.169.254/latest",
            "/v1//x",
            "/v1/%2e%2e/x",
            "/v1/%2E%2E/x",
            "/v1/.%2e/x",
            "/v1/%2e./x",
            "/v1/%252e%252e/x",
            "/v1/%25252e/x",
            "/v1/%2F/x",
            "/v1/a%2fb",
            "/v1/%5c../x",
            "/v1\\..\\x",
            "/v1/%c0%ae%c0%ae/x",
            "/v1/%c0%af",
            "/v1/%e0%80%ae%e0%80%ae/x",
            "/v1/%ef%bc%8e%ef%bc%8e/x",
            "/v1/\u{ff0e}\u{ff0e}/x",
            "/v1/%00",
            "/v1/x%00.json",
            "/v1/%0d%0aHost:%20evil",
            "/v1/%09",
            "/v1/%7f",
            "/v1/%20..",
            "/v1/..%20",
            "/v1/%3f/x",
            "/v1/%23/x",
            "/v1/%3b/x",
            "/v1/%",
            "/v1/%2",
            "/v1/%zz",
            "/v1/%+1",
            "/v1/%a\u{e9}",
            "/v1/%\u{e9}",
            "/v1/..:x",
            "/v1/...:x/y",
            "/v1/chat./completions",
            "/v1/chat../completions",
            "/v1/models/m.:generateContent",
            "v1/x",
            "",
            "*",
        ];
        for raw in refused {
            assert!(normalize_path(raw).is_err(), "{raw:?} must be refused");
        }
    }

    #[test]
    fn plain_paths_are_decoded_once_and_forwarded_canonical() {
        for (raw, want) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/", "/v1/"),
            ("/", "/"),
            (
                "/vertex/v1/projects/p/models/m:generateContent",
                "/vertex/v1/projects/p/models/m:generateContent",
            ),
            ("/v1/models/gpt%2d4", "/v1/models/gpt-4"),
            ("/v1/%41bc", "/v1/Abc"),
            ("/v1/a.b/c..d/.e", "/v1/a.b/c..d/.e"),
            ("/v1/%7b%7d", "/v1/%7B%7D"),
            ("/v1/x@y,z=1!", "/v1/x@y,z=1!"),
            ("/v1/a+b/c%2Bd", "/v1/a%2Bb/c%2Bd"),
        ] {
            let got = normalize_path(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(got, want, "{raw:?}");
            assert_eq!(normalize_path(&got).as_deref(), Ok(want), "fixed point");
        }
    }

    #[test]
    fn models_in_paths_and_queries_are_found() {
        for (path, want) in [
            ("/v1/chat/completions", vec![]),
            ("/v1/models", vec![]),
            ("/v1/models/qwen-plus", vec!["qwen-plus"]),
            ("/openai/deployments/qwen/chat/completions", vec!["qwen"]),
            ("/v1/engines/qwen/chat/completions", vec!["qwen"]),
            (
                "/v1/projects/p/locations/l/publishers/google/models/gemini-pro:generateContent",
                vec!["gemini-pro"],
            ),
            (
                "/bedrock/model/anthropic.claude-v2/invoke",
                vec!["anthropic.claude-v2"],
            ),
            ("/v1/Deployments/a/models/b", vec!["a", "b"]),
        ] {
            assert_eq!(path_models(path), want, "{path}");
        }
        assert_eq!(query_models("api-version=1&model=qwen"), vec!["qwen"]);
        assert_eq!(
            query_models("MODEL=a&x=1&%6Dodel=b+c&model"),
            vec!["a", "b c", ""]
        );
        assert!(query_models("models=a&modelx=b").is_empty());
        assert!(check_query("a=1&b=%2e%2e%2f").is_ok());
        for bad in ["a=%00", "a=%", "a=%zz", "a=%0d%0a", "a=\\x", "a=%a\u{e9}"] {
            assert!(check_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_name_the_path_and_the_reason() {
        let e = normalize_path("/v1/%252e%252e/x").expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("%252e%252e") && text.contains("double"),
            "{text}"
        );
        let e = normalize_path("/v1/%00").expect_err("refused").to_string();
        assert!(e.contains("NUL"), "{e}");
    }

    /// The model the upstream reads, or a refusal: encodings, whitespace and
    /// key orders.
    #[test]
    fn the_model_is_read_as_the_upstream_reads_it() {
        let named = |s: &str| Ok(Some(s.to_string()));
        type Want = Result<Option<String>, &'static str>;
        let cases: Vec<(&[u8], Want)> = vec![
            (br#"{"model":"qwen"}"#, named("qwen")),
            (b" {\"model\":\"qwen\"}", named("qwen")),
            (b"\n{\"model\":\"qwen\"}", named("qwen")),
            (b"\r\n\t {\"model\" : \"qwen\" }\n ", named("qwen")),
            (br#"{"messages":[],"model":"qwen"}"#, named("qwen")),
            (
                br#"{"model":"qwen","messages":[{"role":"user"}]}"#,
                named("qwen"),
            ),
            (
                br#"{"stream":true,"messages":[{"model":"x"}],"model":"qwen"}"#,
                named("qwen"),
            ),
            (br#"{"\u006dodel":"qwen"}"#, named("qwen")),
            (br#"{"model":"q\u0077en"}"#, named("qwen")),
            (br#"{"messages":[]}"#, Ok(None)),
            (b"", Ok(None)),
            (b"[1,2]", Ok(None)),
            (b"\"model\"", Ok(None)),
            // Duplicates, in every spelling.
            (br#"{"model":"qwen","model":"gpt"}"#, Err("repeats")),
            (br#"{"model":"qwen", "\u006dodel":"gpt"}"#, Err("repeats")),
            (
                br#"{"model":"qwen","messages":[],"model":"qwen"}"#,
                Err("repeats"),
            ),
            (
                br#"{"messages":[{"a":1,"a":2}],"model":"qwen"}"#,
                Err("repeats"),
            ),
            (
                br#"{"Model":"gpt","model":"qwen"}"#,
                Err("beside or instead"),
            ),
            (br#"{"MODEL":"gpt"}"#, Err("beside or instead")),
            // Not a string.
            (br#"{"model":null}"#, Err("not a string")),
            (br#"{"model":1}"#, Err("not a string")),
            (br#"{"model":["qwen"]}"#, Err("not a string")),
            (br#"{"model":{"name":"qwen"}}"#, Err("not a string")),
            (br#"{"model":true}"#, Err("not a string")),
            // Not JSON as every parser reads it.
            (b"\xef\xbb\xbf{\"model\":\"qwen\"}", Err("JSON")),
            (
                b"{\x00\"\x00m\x00o\x00d\x00e\x00l\x00\"\x00:\x00\"\x00q\x00\"\x00}\x00",
                Err("JSON"),
            ),
            (b"\xff\xfe{\x00}\x00", Err("JSON")),
            (br#"{"model":"qwen"} {"model":"gpt"}"#, Err("JSON")),
            (br#"{"model":"qwen"},"#, Err("JSON")),
            (br#"{"model":"qwen",}"#, Err("JSON")),
            (br#"{'model':'qwen'}"#, Err("JSON")),
            (br#"{"model":"qwen" /* gpt */}"#, Err("JSON")),
            (br#"{"model":"\ud800"}"#, Err("JSON")),
            (b"{\"model\":\"q\xffen\"}", Err("JSON")),
            (br#"{"model":"qwen","t":NaN}"#, Err("JSON")),
            (b"model=qwen", Err("JSON")),
            (b" ", Err("JSON")),
        ];
        for (body, want) in cases {
            let got = read_model(body);
            let shown = String::from_utf8_lossy(body);
            match (&got, want) {
                (Ok(m), Ok(w)) => assert_eq!(m, &w, "{shown:?}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{shown:?}: {e}"),
                (got, want) => panic!("{shown:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn duplicates_are_found_in_objects_of_any_size() {
        for n in [2usize, 16, 17, 1000] {
            let mut keys: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
            let ok = format!("{{\"model\":\"m\",{}}}", keys.join(","));
            assert_eq!(read_model(ok.as_bytes()), Ok(Some("m".into())), "{n} keys");
            keys.push(format!("\"k{}\":0", n / 2));
            let dup = format!("{{\"model\":\"m\",{}}}", keys.join(","));
            assert!(
                matches!(read_model(dup.as_bytes()), Err(BodyError::DuplicateKey(k)) if k == format!("k{}", n / 2)),
                "{n} keys"
            );
        }
    }

    #[test]
    fn deep_bodies_are_refused_not_overflowed() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            read_model(deep.as_bytes()),
            Err(BodyError::NotJson(_))
        ));
    }
}
