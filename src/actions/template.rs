//! `${...}` templates in step parameters: `${input.userId}`, `${steps.fetch.body.items}`,
//! `${env.CMS_API_URL}`, `${run.id}`. A string that is exactly one template becomes the value it
//! names (an object stays an object); templates inside longer strings are replaced by their text.
//!
//! A path that names nothing (a field the object does not have, an index past the end, a field
//! of a string or number) is an error naming the template, so a typo or a missing input fails the
//! step clearly; a path through a `null` is `null`. `${input.reason:-manual}` gives a default,
//! used when the path names nothing or `null` (for `env`: when the variable is unset or empty;
//! for `steps`: also when the step has no output); `${input.note:-}` is an explicit empty
//! default. A default is text.
//!
//! In a `when` condition a path that names nothing is `null`, so falsy: `when = "${input.flag}"`
//! is how a step tests an optional flag. An unknown root, a step with no output and an unclosed
//! template are errors there too.
//!
//! URLs ([`render_url`]) are rendered part by part: the origin (scheme, userinfo, host, port) as
//! written (only `${env...}` may fill it, unless the step sets `allow_dynamic_host`), and every
//! value after it percent-encoded for the path segment, query or fragment it lands in, so that a
//! run's input can never choose where a request goes.

use crate::definition::actions::{templates, url_origin_len};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// What templates can name.
pub struct Scope<'a> {
    pub input: &'a Value,
    pub steps: &'a serde_json::Map<String, Value>,
    pub run: Value,
}

/// What a path that names nothing becomes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// An error naming the template (parameters).
    Fails,
    /// `null` (`when` conditions).
    IsNull,
}

impl Scope<'_> {
    /// The value a template's inner text names, its `:-default` applied.
    fn lookup(&self, text: &str, missing: Missing) -> Result<Value, String> {
        let (path, default) = match text.split_once(":-") {
            Some((path, default)) => (path.trim(), Some(default)),
            None => (text, None),
        };
        let found = match self.find(path) {
            // A default also stands in for a step that has no output (not run: a branch not taken).
            Err(_) if default.is_some() && path.starts_with("steps.") => None,
            other => other?,
        };
        match (found, default) {
            (Some(value), _) if !value.is_null() => Ok(value),
            (_, Some(default)) => Ok(Value::String(default.to_owned())),
            (Some(null), None) => Ok(null),
            (None, None) if missing == Missing::IsNull => Ok(Value::Null),
            (None, None) if path.starts_with("env.") => {
                Err(format!("`${{{path}}}`: the environment variable {} is not set", &path[4..]))
            }
            (None, None) => Err(format!(
                "`${{{path}}}` names nothing (no such field); write `${{{path}:-default}}` if it is optional"
            )),
        }
    }

    /// `None` when the path names nothing; an error when its root or step does not exist.
    fn find(&self, path: &str) -> Result<Option<Value>, String> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or("");
        let mut value = match root {
            "input" => self.input.clone(),
            "run" => self.run.clone(),
            "steps" => {
                let step = parts.next().ok_or_else(|| format!("`${{{path}}}` names no step"))?;
                self.steps
                    .get(step)
                    .ok_or_else(|| {
                        format!("`${{{path}}}`: step `{step}` has no output (not run yet, or no such step)")
                    })?
                    .clone()
            }
            "env" => {
                // Unset and empty are alike: both take the default.
                let name: Vec<&str> = parts.collect();
                return Ok(std::env::var(name.join(".")).ok().filter(|v| !v.is_empty()).map(Value::String));
            }
            other => return Err(format!("`${{{path}}}`: unknown root `{other}` (input, steps, env, run)")),
        };
        for part in parts {
            value = match value {
                Value::Object(mut map) => match map.remove(part) {
                    Some(next) => next,
                    None => return Ok(None),
                },
                Value::Array(items) => match part.parse::<usize>().ok().and_then(|i| items.into_iter().nth(i)) {
                    Some(next) => next,
                    None => return Ok(None),
                },
                Value::Null => Value::Null,
                _ => return Ok(None),
            };
        }
        Ok(Some(value))
    }
}

/// The text a value stands for inside a longer string.
fn as_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Renders the templates of a string.
pub fn render_str(text: &str, scope: &Scope) -> Result<String, String> {
    Ok(as_text(&render_string(text, scope, Missing::Fails)?))
}

fn render_string(text: &str, scope: &Scope, missing: Missing) -> Result<Value, String> {
    let trimmed = text.trim();
    if trimmed.starts_with("${") && trimmed.ends_with('}') && trimmed[2..].find('}') == Some(trimmed.len() - 3) {
        return scope.lookup(trimmed[2..trimmed.len() - 1].trim(), missing);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed template in `{text}`"))?;
        out.push_str(&as_text(&scope.lookup(after[..end].trim(), missing)?));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Renders every string inside a JSON value.
pub fn render_value(value: &Value, scope: &Scope) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => render_string(text, scope, Missing::Fails)?,
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, scope)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| Ok((k.clone(), render_value(v, scope)?))).collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// What a substituted value is encoded as: everything but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`). Stricter than each part needs, and the same for all three: a value
/// can then hold no `/`, `?`, `#`, `&`, `=`, `@`, `:` or `%` that the URL would read as syntax.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A text percent-encoded as one URL component (a path segment, a query value).
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// Renders an `http` step's URL. The origin (see [`url_origin_len`]) is rendered as written;
/// each value after it is percent-encoded for the part it lands in. A value that makes a whole
/// path segment `.` or `..` is refused (the URL parser would walk the path, `%2e` included), and
/// the rendered URL must keep the origin its origin part renders to alone (unless the step
/// allows a dynamic host: then its origin is whatever the origin part rendered to, but the
/// values after it are still encoded).
pub fn render_url(url: &str, allow_dynamic_host: bool, scope: &Scope) -> Result<String, String> {
    let origin_len = url_origin_len(url);
    // Load refuses these; a run started before that rule holds a snapshot that did not.
    if !allow_dynamic_host && let Some(template) = templates(&url[..origin_len]).iter().find(|t| t.root() != "env") {
        return Err(format!(
            "`{url}`: `${{{}}}` would choose the URL's scheme, host or port, and the step does not set allow_dynamic_host; refused",
            template.path
        ));
    }
    let mut out = render_str(&url[..origin_len], scope)?;
    let origin = out.clone();
    // Byte ranges of `out` that substituted values fill, for the dot-segment check.
    let mut filled: Vec<std::ops::Range<usize>> = Vec::new();
    let rest = &url[origin_len..];
    let mut at = 0;
    for template in templates(rest) {
        out.push_str(&rest[at..template.start]);
        // Past a literal `?` or `#` the value is in the query or the fragment; the same
        // encoding serves all three parts, only path segments can be dot segments.
        let in_path = !out.contains(['?', '#']);
        let value = as_text(&scope.lookup(template.path, Missing::Fails)?);
        // Encoded, `../x` is one segment `..%2Fx` to us, but a server or proxy that decodes
        // `%2F` before resolving dot segments walks it: refuse any dot piece of the value.
        if in_path && value.split(['/', '\\']).any(is_dot_segment) {
            return Err(format!(
                "`{url}`: the value of `${{{}}}` holds a `.` or `..` path piece, which could walk the URL's path; refused",
                template.path
            ));
        }
        let start = out.len();
        out.extend(utf8_percent_encode(&value, COMPONENT));
        if in_path {
            filled.push(start..out.len());
        }
        at = template.end;
    }
    if rest[at..].contains("${") {
        return Err(format!("unclosed template in `{url}`"));
    }
    out.push_str(&rest[at..]);
    refuse_dot_segments(&out, &filled, url)?;
    if !allow_dynamic_host {
        same_origin(&origin, &out, url)?;
    }
    Ok(out)
}

/// A path segment that a substituted value helped make `.` or `..` (`%2e` is a dot to the
/// WHATWG parser, which resolves such segments: `/items/..` is `/`).
fn refuse_dot_segments(rendered: &str, filled: &[std::ops::Range<usize>], url: &str) -> Result<(), String> {
    let path_end = rendered.find(['?', '#']).unwrap_or(rendered.len());
    let mut start = 0;
    // The URL parser reads `\\` as `/` in http(s) URLs.
    for segment in rendered[..path_end].split(['/', '\\']) {
        let range = start..start + segment.len();
        start = range.end + 1;
        if is_dot_segment(segment) && filled.iter().any(|f| f.start < range.end && range.start < f.end) {
            return Err(format!(
                "`{url}`: a substituted value makes the path segment `{segment}`, which would walk the URL's path; refused"
            ));
        }
    }
    Ok(())
}

/// Whether a path piece is `.` or `..` to the URL parser (`%2e` is a dot to it).
fn is_dot_segment(piece: &str) -> bool {
    let dots = piece.to_ascii_lowercase().replace("%2e", ".");
    dots == "." || dots == ".."
}

/// The rendered URL must go where its origin part says: same scheme, userinfo, host and port.
fn same_origin(origin: &str, rendered: &str, url: &str) -> Result<(), String> {
    let key = |text: &str| {
        reqwest::Url::parse(text.trim()).ok().map(|u| {
            (
                u.scheme().to_owned(),
                u.username().to_owned(),
                u.password().map(str::to_owned),
                u.host_str().map(str::to_owned),
                u.port_or_known_default(),
            )
        })
    };
    match (key(origin), key(rendered)) {
        (Some(expected), Some(actual)) if expected == actual => Ok(()),
        // Not a URL at all: the request's own check says so.
        (_, None) => Ok(()),
        _ => Err(format!(
            "`{url}`: the substituted values change the URL's scheme, host or port; refused (the origin must be complete before the first value after it)"
        )),
    }
}

/// Whether a value counts as true for `when`: not null, false, 0, "", "false", [] or {}.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !(s.is_empty() || s == "false" || s == "0"),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// Evaluates a `when` condition: a template (truthy or not), or `<template> == <text>` /
/// `<template> != <text>` comparing the rendered value's text.
pub fn condition(text: &str, scope: &Scope) -> Result<bool, String> {
    for (operator, equal) in [("==", true), ("!=", false)] {
        if let Some((left, right)) = text.split_once(operator) {
            let left = as_text(&render_string(left.trim(), scope, Missing::IsNull)?);
            let right = as_text(&render_string(right.trim().trim_matches('"'), scope, Missing::IsNull)?);
            return Ok((left == right) == equal);
        }
    }
    Ok(truthy(&render_string(text, scope, Missing::IsNull)?))
}

/// Whether a text holds a template naming earlier steps' outputs.
pub fn mentions_steps(text: &str) -> bool {
    text.contains("${steps.") || text.contains("${ steps.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_scope<T>(f: impl FnOnce(&Scope) -> T) -> T {
        let input = json!({ "userId": 7, "tags": ["a", "b"] });
        let mut steps = serde_json::Map::new();
        steps.insert("fetch".to_owned(), json!({ "body": { "items": [1, 2], "next": null } }));
        f(&Scope { input: &input, steps: &steps, run: json!({ "id": "r1" }) })
    }

    #[test]
    fn whole_templates_keep_their_type_and_inner_ones_become_text() {
        with_scope(|scope| {
            assert_eq!(render_value(&json!("${steps.fetch.body.items}"), scope).unwrap(), json!([1, 2]));
            assert_eq!(render_str("/users/${input.userId}?tag=${input.tags.1}", scope).unwrap(), "/users/7?tag=b");
            assert_eq!(
                render_value(&json!({ "u": "${input.userId}", "n": 3 }), scope).unwrap(),
                json!({ "u": 7, "n": 3 })
            );
            assert_eq!(render_str("${run.id}", scope).unwrap(), "r1");
        });
    }

    #[test]
    fn mistakes_are_named() {
        with_scope(|scope| {
            assert!(render_str("${steps.nope.x}", scope).unwrap_err().contains("`nope`"));
            assert!(render_str("${secret.x}", scope).unwrap_err().contains("unknown root"));
            assert!(render_str("${env.WFO_SURELY_UNSET_VARIABLE}", scope).unwrap_err().contains("not set"));
            assert_eq!(render_str("${env.WFO_SURELY_UNSET_VARIABLE:-fallback}", scope).unwrap(), "fallback");
            assert_eq!(render_str("${env.WFO_SURELY_UNSET_VARIABLE:-}", scope).unwrap(), "");
            assert!(render_str("${input.userId", scope).unwrap_err().contains("unclosed"));
        });
    }

    #[test]
    fn conditions_compare_text() {
        with_scope(|scope| {
            assert!(condition("${input.userId} == 7", scope).unwrap());
            assert!(condition("${run.id} != r2", scope).unwrap());
            assert!(!condition("${input.userId} == \"8\"", scope).unwrap());
            assert!(condition("${steps.fetch.body.items}", scope).unwrap());
            assert!(!condition("${steps.fetch.body.next}", scope).unwrap());
        });
    }

    #[test]
    fn a_path_that_names_nothing_is_an_error_unless_it_has_a_default() {
        with_scope(|scope| {
            let err = render_str("reason: ${input.reason}", scope).unwrap_err();
            assert!(err.contains("`${input.reason}` names nothing"), "{err}");
            assert!(render_value(&json!("${input.tags.5}"), scope).unwrap_err().contains("input.tags.5"));
            assert!(render_value(&json!("${input.userId.x}"), scope).is_err());
            assert!(render_value(&json!("${steps.fetch.body.nope}"), scope).is_err());
            assert!(render_value(&json!("${run.nope}"), scope).is_err());
            assert_eq!(render_str("${input.reason:-manual}", scope).unwrap(), "manual");
            assert_eq!(render_value(&json!("${input.reason:-}"), scope).unwrap(), json!(""));
            assert_eq!(render_str("${steps.fetch.body.nope:-d}/${run.nope:-r}", scope).unwrap(), "d/r");
            assert_eq!(render_str("${steps.gone.x:-d}", scope).unwrap(), "d");
            // Present values win over the default; a null takes it; a path through null is null.
            assert_eq!(render_value(&json!("${input.userId:-0}"), scope).unwrap(), json!(7));
            assert_eq!(render_str("${steps.fetch.body.next:-none}", scope).unwrap(), "none");
            assert_eq!(render_value(&json!("${steps.fetch.body.next.deeper}"), scope).unwrap(), json!(null));
            assert_eq!(render_str("${input.x:-a.b:c}", scope).unwrap(), "a.b:c");
        });
    }

    #[test]
    fn in_conditions_a_missing_field_is_falsy() {
        with_scope(|scope| {
            assert!(!condition("${input.flag}", scope).unwrap());
            assert!(condition("${input.flag} != yes", scope).unwrap());
            assert!(!condition("${input.flag} == yes", scope).unwrap());
            assert!(condition("${input.flag:-yes} == yes", scope).unwrap());
            // Typos of roots and steps still fail loudly.
            assert!(condition("${inptu.flag}", scope).is_err());
            assert!(condition("${steps.nope.flag}", scope).is_err());
        });
    }

    fn url_with(input: serde_json::Value, url: &str) -> Result<String, String> {
        let steps = serde_json::Map::new();
        render_url(url, false, &Scope { input: &input, steps: &steps, run: json!({ "id": "r1" }) })
    }

    #[test]
    fn values_in_a_url_are_encoded_for_the_part_they_land_in() {
        let url = "http://127.0.0.1:8080/items/${input.id}?q=${input.q}#${input.f}";
        let rendered = |id: &str, q: &str| url_with(json!({ "id": id, "q": q, "f": "x" }), url);
        assert_eq!(rendered("7", "a b").unwrap(), "http://127.0.0.1:8080/items/7?q=a%20b#x");
        assert_eq!(
            rendered("@127.0.0.1:9/x", "a&admin=1#frag").unwrap(),
            "http://127.0.0.1:8080/items/%40127.0.0.1%3A9%2Fx?q=a%26admin%3D1%23frag#x"
        );
        assert_eq!(rendered("a/b?c", "%2e").unwrap(), "http://127.0.0.1:8080/items/a%2Fb%3Fc?q=%252e#x");
        assert_eq!(rendered("%2e%2ex", "x").unwrap(), "http://127.0.0.1:8080/items/%252e%252ex?q=x#x");
        assert_eq!(rendered("ok", "../../admin").unwrap(), "http://127.0.0.1:8080/items/ok?q=..%2F..%2Fadmin#x");
        assert_eq!(rendered("ü\r\n", "x").unwrap(), "http://127.0.0.1:8080/items/%C3%BC%0D%0A?q=x#x");
        // Each of these, parsed as reqwest does, still goes to the intended host and path.
        for hostile in ["@127.0.0.1:9/x", "..x/y..", "%2e%2ex", "x?y#z", "\\evil"] {
            let parsed = reqwest::Url::parse(&rendered(hostile, hostile).unwrap()).unwrap();
            assert_eq!((parsed.host_str(), parsed.port()), (Some("127.0.0.1"), Some(8080)), "{hostile}");
            assert!(parsed.path().starts_with("/items/") && parsed.path().matches('/').count() == 2, "{hostile}");
            assert_eq!(parsed.query_pairs().count(), 1, "{hostile}");
        }
    }

    #[test]
    fn a_value_that_makes_a_dot_segment_is_refused() {
        let url = "http://h/items/${input.id}/more";
        // Whole or as a piece: a server may decode `%2F` (or `%2e`) before resolving dots.
        for dots in [".", "..", "%2e", "%2E%2e", "../../admin", "a/../b", "a\\..", "./x"] {
            let result = url_with(json!({ "id": dots }), url);
            assert!(result.is_err(), "{dots}: {result:?}");
        }
        let err = url_with(json!({ "id": ".." }), url).unwrap_err();
        assert!(err.contains("walk"), "{err}");
        assert!(url_with(json!({ "a": ".", "b": "." }), "http://h/x/${input.a}${input.b}").is_err());
        assert!(url_with(json!({ "id": "..x" }), url).is_ok());
        // In the query a dot is a dot.
        assert!(url_with(json!({ "id": ".." }), "http://h/x?d=${input.id}").is_ok());
        // The author's own dot segments are the author's business.
        assert!(url_with(json!({ "id": "1" }), "http://h/a/../${input.id}").is_ok());
    }

    #[test]
    fn the_origin_comes_from_the_definition_or_the_environment() {
        // An unset variable's default stands in for operator configuration.
        assert_eq!(
            url_with(
                json!({ "id": "a b" }),
                "${env.WFO_SURELY_UNSET_BASE:-http://127.0.0.1:8080/api?key=k}&id=${input.id}"
            )
            .unwrap(),
            "http://127.0.0.1:8080/api?key=k&id=a%20b"
        );
        // What load refuses is refused when it runs too (a snapshot from before the rule).
        assert!(
            url_with(json!({ "p": "@evil/" }), "http://127.0.0.1${input.p}")
                .unwrap_err()
                .contains("allow_dynamic_host")
        );
        let host = "${env.WFO_SURELY_UNSET_HOST:-http://127.0.0.1}";
        // A value right after the origin would extend the host: refused.
        let err = url_with(json!({ "id": "evil.example" }), &format!("{host}${{input.id}}")).unwrap_err();
        assert!(err.contains("host"), "{err}");
        let err = url_with(json!({ "id": "81" }), &format!("{host}:80${{input.id}}/")).unwrap_err();
        assert!(err.contains("port"), "{err}");
        assert_eq!(url_with(json!({ "id": "1" }), &format!("{host}/${{input.id}}")).unwrap(), "http://127.0.0.1/1");
        // With a dynamic host, the origin is rendered as it is, the rest still encoded.
        let input = json!({ "base": "http://127.0.0.1:9", "id": "a/b" });
        let steps = serde_json::Map::new();
        let scope = Scope { input: &input, steps: &steps, run: json!({}) };
        assert_eq!(render_url("${input.base}/x/${input.id}", true, &scope).unwrap(), "http://127.0.0.1:9/x/a%2Fb");
    }

    #[test]
    fn truthiness() {
        assert!(!truthy(&json!(null)) && !truthy(&json!(false)) && !truthy(&json!("")) && !truthy(&json!(0)));
        assert!(truthy(&json!(true)) && truthy(&json!("yes")) && truthy(&json!([1])));
    }
}
