//! The AI gateway's reading of a request (`skymesh_controller::gateway::request`):
//! the path and the model it routes on.

use skymesh_controller::gateway::request::{normalize_path, read_model};

/// Target `gateway_request`: `data` is a request path, a newline, and a body.
pub fn gateway_request(data: &[u8]) {
    let (path, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(path) = std::str::from_utf8(path) {
        path_invariants(path);
    }
    model_invariants(body);
}

/// A normalised path is a fixed point of [`normalize_path`], absolute, ASCII,
/// and has nothing a server could read as a climb, a separator, a parameter
/// or an end: no dot segment, no empty segment inside, no `;`, no NUL or
/// control byte, and no `%` escape that decodes to `/`, `\`, `.`, `%`, `;`, `?`,
/// `#`, NUL or a control byte.
fn path_invariants(raw: &str) {
    let norm = match normalize_path(raw) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(
        normalize_path(&norm).as_deref(),
        Ok(norm.as_str()),
        "not a fixed point: {raw:?} -> {norm:?}"
    );
    assert!(norm.starts_with('/'), "{norm:?}");
    assert!(norm.is_ascii(), "{norm:?}");
    let bytes = norm.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        assert!(b > 0x20 && b != 0x7f, "control byte or space in {norm:?}");
        assert!(b != b';' && b != b'\\', "{:?} in {norm:?}", b as char);
        if b == b'%' {
            let hex = norm.get(i + 1..i + 3).expect("a complete escape");
            let v = u8::from_str_radix(hex, 16).expect("hex escape");
            assert!(
                !matches!(v, b'/' | b'\\' | b'.' | b'%' | b';' | b'?' | b'#' | 0..=0x20 | 0x7f..),
                "escape %{hex} in {norm:?}"
            );
        }
    }
    let segments: Vec<&str> = norm[1..].split('/').collect();
    for (n, seg) in segments.iter().enumerate() {
        assert!(
            !seg.is_empty() || n == segments.len() - 1,
            "empty segment in {norm:?}"
        );
        let dots = !seg.is_empty() && seg.bytes().all(|b| b == b'.');
        assert!(!dots, "dot segment {seg:?} in {norm:?}");
    }
}

/// [`read_model`] agrees with a plain JSON parser wherever it answers: a body
/// it reads is JSON, and the model it returns is the top-level `"model"`
/// string that parser sees; a body without a model has no `"model"` key.
fn model_invariants(body: &[u8]) {
    let verdict = read_model(body);
    let parsed = serde_json::from_slice::<serde_json::Value>(body);
    match verdict {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(model) if body.is_empty() => assert_eq!(model, None),
        Ok(model) => {
            let value = parsed.expect("read_model accepted a body that is not JSON");
            let seen = value.get("model");
            match &model {
                Some(m) => assert_eq!(seen, Some(&serde_json::Value::String(m.clone()))),
                None => assert_eq!(seen, None, "a model read_model did not see"),
            }
            if let Some(obj) = value.as_object() {
                for key in obj.keys() {
                    assert!(
                        key == "model" || key.to_lowercase() != "model",
                        "a second spelling {key:?} of the model passed"
                    );
                }
            }
        }
    }
}
