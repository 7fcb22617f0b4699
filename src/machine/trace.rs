//! W3C trace context (<https://www.w3.org/TR/trace-context/>) as plain data: what a run keeps of
//! the trace it belongs to, and the `traceparent` header's text form. Pure: parsing and
//! formatting only; spans are made and exported by the engine and the binary.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest `tracestate` kept: the spec's 32 members of at most 256 characters would be 8 KiB,
/// more than a run should carry; 512 is what the spec asks every platform to pass on.
pub const MAX_TRACESTATE: usize = 512;

/// One span's place in a trace, as `traceparent` and `tracestate` carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The trace flags; bit 0 is "sampled".
    pub flags: u8,
    /// The vendors' `tracestate` header as received (empty when none), passed on unchanged.
    pub tracestate: String,
}

/// A run's place in its trace, fixed when the run is created so that every replica parents its
/// spans to the same run span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunTrace {
    /// The run span: the trace id, the run span's own id (chosen at creation; the span is
    /// exported when the run ends, by whichever replica ends it), flags and tracestate.
    pub span: TraceContext,
    /// The span of the caller that started the run (its `traceparent`), the run span's parent.
    pub parent: Option<[u8; 8]>,
}

impl RunTrace {
    /// The context handed on to what the run calls when the run span is not exported (tracing
    /// off): the caller's own, so that a downstream service still joins the caller's trace as
    /// a child of a span that exists. `None` when no caller sent a context.
    pub fn caller(&self) -> Option<TraceContext> {
        self.parent.map(|span_id| TraceContext { span_id, ..self.span.clone() })
    }
}

/// Why a `traceparent` was refused. The spec says to ignore such a header (and start afresh).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    #[error("traceparent must be `00-<32 hex>-<16 hex>-<2 hex>` in lowercase hex")]
    Malformed,
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    #[error("traceparent trace id or parent id is all zeros")]
    ZeroId,
}

/// Whether a `tracestate` is a list of at most 32 `key=value` members (empty members allowed),
/// keys of lowercase letters, digits and `_-*/@`, values without `,` or `=`.
fn valid_tracestate(text: &str) -> bool {
    let members: Vec<&str> =
        text.split(',').map(|m| m.trim_matches(|c| c == ' ' || c == '\t')).filter(|m| !m.is_empty()).collect();
    members.len() <= 32
        && members.iter().all(|member| {
            member.split_once('=').is_some_and(|(key, value)| {
                !key.is_empty()
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(&b))
                    && !value.is_empty()
                    && !value.contains(['=', ','])
            })
        })
}

impl TraceContext {
    /// Parses a `traceparent` header, with the `tracestate` that came with it (dropped when it
    /// is over [`MAX_TRACESTATE`] or holds characters a header may not).
    ///
    /// Version 00 must be exactly `00-<trace id>-<parent id>-<flags>`. A later version is read
    /// the same way and may carry more after another `-` (the spec's forward compatibility).
    /// Hex is lowercase only, as the spec requires.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<TraceContext, TraceparentError> {
        let text = traceparent.trim_matches(|c| c == ' ' || c == '\t');
        let bytes = text.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceparentError::Malformed);
        }
        let version = hex_bytes::<1>(&text[0..2])?[0];
        if version == 0xff {
            return Err(TraceparentError::InvalidVersion);
        }
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(TraceparentError::Malformed);
        }
        let trace_id = hex_bytes::<16>(&text[3..35])?;
        let span_id = hex_bytes::<8>(&text[36..52])?;
        let flags = hex_bytes::<1>(&text[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(TraceparentError::ZeroId);
        }
        // One that does not parse is not passed on (W3C): at most 32 `key=value` members.
        let tracestate = tracestate
            .map(|s| s.trim_matches(|c| c == ' ' || c == '\t'))
            .filter(|s| s.len() <= MAX_TRACESTATE && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .filter(|s| valid_tracestate(s))
            .unwrap_or_default()
            .to_owned();
        // Only the sampled bit is defined in version 00; the others are passed on as zeros.
        Ok(TraceContext { trace_id, span_id, flags: flags & 0x01, tracestate })
    }

    /// The `traceparent` header's value (version 00).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(self.span_id), self.flags)
    }

    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The same trace, flags and state, at another span.
    pub fn at_span(&self, span_id: [u8; 8]) -> TraceContext {
        TraceContext { span_id, ..self.clone() }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex_bytes<const N: usize>(text: &str) -> Result<[u8; N], TraceparentError> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(TraceparentError::Malformed);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| TraceparentError::Malformed)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses_and_formats_back() {
        let context = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(context.span_id), "00f067aa0ba902b7");
        assert!(context.sampled());
        assert_eq!(context.tracestate, "congo=t61rcWkgMzE");
        assert_eq!(context.traceparent(), EXAMPLE);
        let unsampled = TraceContext::parse(&EXAMPLE.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.tracestate, "");
    }

    #[test]
    fn invalid_versions_are_refused_and_later_ones_read() {
        assert_eq!(TraceContext::parse(&EXAMPLE.replacen("00", "ff", 1), None), Err(TraceparentError::InvalidVersion));
        assert_eq!(TraceContext::parse(&format!("{EXAMPLE}-extra"), None), Err(TraceparentError::Malformed));
        let later = TraceContext::parse(&format!("cc{}-what-comes-next", &EXAMPLE[2..]), None).unwrap();
        assert_eq!(later.traceparent(), EXAMPLE, "passed on as version 00");
        assert_eq!(TraceContext::parse(&format!("cc{}x", &EXAMPLE[2..]), None), Err(TraceparentError::Malformed));
    }

    #[test]
    fn all_zero_ids_are_refused() {
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        assert_eq!(TraceContext::parse(zero_trace, None), Err(TraceparentError::ZeroId));
        assert_eq!(TraceContext::parse(zero_span, None), Err(TraceparentError::ZeroId));
    }

    #[test]
    fn uppercase_hex_and_other_shapes_are_refused() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceContext::parse(bad, None), Err(TraceparentError::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_tracestate_too_long_or_with_control_characters_is_dropped() {
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
        assert_eq!(TraceContext::parse(EXAMPLE, Some(&long)).unwrap().tracestate, "");
        assert_eq!(TraceContext::parse(EXAMPLE, Some("a=b\r\nx: y")).unwrap().tracestate, "");
    }

    #[test]
    fn a_tracestate_that_does_not_parse_is_not_passed_on() {
        let kept = |state: &str| TraceContext::parse(EXAMPLE, Some(state)).unwrap().tracestate;
        assert_eq!(kept("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"), "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
        assert_eq!(kept("vendor@tenant=x, ,b=2"), "vendor@tenant=x, ,b=2");
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(kept(&many.join(",")), "", "more than 32 members");
        for bad in ["novalue", "Upper=x", "a==b", "=x", "a=b=c"] {
            assert_eq!(kept(bad), "", "{bad}");
        }
    }

    #[test]
    fn the_caller_context_is_the_run_trace_at_the_callers_span() {
        let span = TraceContext::parse(EXAMPLE, Some("k=v")).unwrap();
        let run = RunTrace { span: span.at_span([7; 8]), parent: Some(span.span_id) };
        assert_eq!(run.caller(), Some(span));
        assert_eq!(RunTrace { parent: None, ..run }.caller(), None);
    }
}
