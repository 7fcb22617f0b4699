//! Encodings of what the store keeps: transitions and ready tasks in MessagePack (rmp-serde),
//! the run summary as hash fields.

use super::{Dispatch, ReadyTask, RunSummary};
use crate::machine::{Millis, Recorded, RunState, Status};

pub fn encode_recorded(recorded: &Recorded) -> Vec<u8> {
    rmp_serde::to_vec(recorded).expect("transitions always encode")
}

pub fn decode_recorded(bytes: &[u8]) -> Result<Recorded, String> {
    rmp_serde::from_slice(bytes).map_err(|err| format!("undecodable transition: {err}"))
}

/// Decodes a compacted log: MessagePack values back to back.
pub fn decode_compacted(mut bytes: &[u8]) -> Result<Vec<Recorded>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut deserializer = rmp_serde::Deserializer::new(&mut bytes);
        let recorded: Recorded = serde::Deserialize::deserialize(&mut deserializer)
            .map_err(|err| format!("undecodable transition #{} in compacted log: {err}", out.len() + 1))?;
        out.push(recorded);
    }
    Ok(out)
}

/// A ready task of run `run`, step attempt `dispatch`, in `state`, encoded as a [`ReadyTask`]
/// without copying the state.
pub fn encode_task(run: &str, dispatch: Dispatch, state: &RunState) -> Vec<u8> {
    /// [`ReadyTask`]'s shape, borrowed.
    #[derive(serde::Serialize)]
    struct TaskRef<'a> {
        run: &'a str,
        step: u32,
        attempt: u32,
        state: &'a RunState,
    }
    rmp_serde::to_vec(&TaskRef { run, step: dispatch.step, attempt: dispatch.attempt, state })
        .expect("tasks always encode")
}

pub fn decode_task(bytes: &[u8]) -> Result<ReadyTask, String> {
    rmp_serde::from_slice(bytes).map_err(|err| format!("undecodable ready task: {err}"))
}

/// The hash fields a summary is written as (the ready entry is written by the store itself).
pub fn summary_fields(summary: &RunSummary) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("workflow", summary.workflow.clone()),
        ("definition", summary.definition.clone()),
        ("status", summary.status.name().to_owned()),
        ("seq", summary.seq.to_string()),
        ("created_at", summary.created_at.to_string()),
        ("updated_at", summary.updated_at.to_string()),
    ];
    fields.push(("step", summary.step.map_or_else(String::new, |s| s.to_string())));
    fields.push(("attempt", summary.attempt.map_or_else(String::new, |a| a.to_string())));
    if let Some(trigger) = &summary.trigger {
        fields.push(("trigger", trigger.clone()));
    }
    if !summary.search.is_empty() {
        fields.push(("search", serde_json::to_string(&summary.search).expect("pairs of strings encode")));
    }
    fields
}

/// Reads a summary back from hash fields; `None` when the hash is empty (no such run).
pub fn summary_from_fields<'a>(
    key: &str,
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Option<RunSummary>, super::StoreError> {
    let mut summary = RunSummary {
        workflow: String::new(),
        definition: String::new(),
        status: Status::Pending,
        step: None,
        attempt: None,
        seq: 0,
        created_at: 0,
        updated_at: 0,
        ready_entries: Vec::new(),
        trigger: None,
        search: Vec::new(),
    };
    let (mut seen, mut has_status) = (false, false);
    let corrupt = |field: &str, value: &str| super::StoreError::Corrupt {
        key: key.to_owned(),
        problem: format!("field `{field}` holds `{value}`"),
    };
    let number = |field: &str, value: &str| value.parse::<u64>().map_err(|_| corrupt(field, value));
    let optional = |field: &str, value: &str| -> Result<Option<u32>, super::StoreError> {
        if value.is_empty() { Ok(None) } else { value.parse().map(Some).map_err(|_| corrupt(field, value)) }
    };
    for (field, value) in fields {
        seen = true;
        match field {
            "workflow" => summary.workflow = value.to_owned(),
            "definition" => summary.definition = value.to_owned(),
            "status" => {
                summary.status = Status::from_name(value).ok_or_else(|| corrupt(field, value))?;
                has_status = true;
            }
            "seq" => summary.seq = number(field, value)?,
            "created_at" => summary.created_at = number(field, value)? as Millis,
            "updated_at" => summary.updated_at = number(field, value)? as Millis,
            "step" => summary.step = optional(field, value)?,
            "attempt" => summary.attempt = optional(field, value)?,
            "ready_entry" => summary.ready_entries = value.split_whitespace().map(str::to_owned).collect(),
            "trigger" => summary.trigger = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "search" => summary.search = serde_json::from_str(value).map_err(|_| corrupt(field, value))?,
            _ => {}
        }
    }
    if !seen {
        return Ok(None);
    }
    if !has_status {
        return Err(corrupt("status", ""));
    }
    if summary.seq == 0 {
        return Err(corrupt("seq", "0"));
    }
    Ok(Some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Transition, Trigger};

    fn one_step() -> crate::definition::WorkflowDef {
        let text = "[[workflow]]\nid = \"w\"\n[[workflow.step]]\nid = \"a\"\naction = \"noop\"\n";
        crate::definition::Registry::parse("test", text).unwrap().get("w").unwrap().def.clone()
    }

    #[test]
    fn compacted_logs_decode_back_to_their_records() {
        let records = vec![
            Recorded {
                at: 1,
                replica: None,
                transition: Transition::RunCreated {
                    workflow: "w".into(),
                    definition: "d".into(),
                    input: "{}".into(),
                    trigger: Trigger::Api,
                    trace: None,
                },
            },
            Recorded { at: 2, replica: Some("r".into()), transition: Transition::StepStarted { step: 0, attempt: 1 } },
        ];
        let blob: Vec<u8> = records.iter().flat_map(encode_recorded).collect();
        assert_eq!(decode_compacted(&blob).unwrap(), records);
        assert!(decode_compacted(&blob[..blob.len() - 1]).is_err());
    }

    /// The shape the build before trace contexts wrote: `run_created` one field shorter.
    mod before_traces {
        use crate::machine::{Millis, Trigger};
        use serde::{Deserialize, Serialize};

        #[derive(Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Transition {
            RunCreated { workflow: String, definition: String, input: String, trigger: Trigger },
        }

        #[derive(Serialize, Deserialize)]
        pub struct Recorded {
            pub at: Millis,
            pub replica: Option<String>,
            pub transition: Transition,
        }
    }

    #[test]
    fn entries_written_before_trace_contexts_still_decode() {
        let old = before_traces::Recorded {
            at: 5,
            replica: Some("r".into()),
            transition: before_traces::Transition::RunCreated {
                workflow: "w".into(),
                definition: "d".into(),
                input: "{}".into(),
                trigger: Trigger::Api,
            },
        };
        let decoded = decode_recorded(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        let Transition::RunCreated { workflow, trace, .. } = &decoded.transition else { panic!("{decoded:?}") };
        assert_eq!((workflow.as_str(), trace), ("w", &None));
    }

    #[test]
    fn a_build_before_trace_contexts_decodes_what_this_one_writes_for_runs_without_one() {
        // A rolling upgrade: the old replicas still read the new ones' entries.
        let recorded = Recorded {
            at: 5,
            replica: None,
            transition: Transition::RunCreated {
                workflow: "w".into(),
                definition: "d".into(),
                input: "{}".into(),
                trigger: Trigger::Api,
                trace: None,
            },
        };
        let old: before_traces::Recorded = rmp_serde::from_slice(&encode_recorded(&recorded)).unwrap();
        let before_traces::Transition::RunCreated { workflow, .. } = old.transition;
        assert_eq!(workflow, "w");
    }

    #[test]
    fn a_trace_context_round_trips_through_the_log_and_the_ready_task() {
        let trace = crate::machine::RunTrace {
            span: crate::machine::TraceContext {
                trace_id: [1; 16],
                span_id: [2; 8],
                flags: 1,
                tracestate: "k=v".into(),
            },
            parent: Some([3; 8]),
        };
        let recorded = Recorded {
            at: 1,
            replica: None,
            transition: Transition::RunCreated {
                workflow: "w".into(),
                definition: "d".into(),
                input: "{}".into(),
                trigger: Trigger::Api,
                trace: Some(trace.clone()),
            },
        };
        assert_eq!(decode_recorded(&encode_recorded(&recorded)).unwrap(), recorded);
        let state = crate::machine::apply(None, &recorded, &one_step()).unwrap();
        assert_eq!(state.trace.as_ref(), Some(&trace));
        let task = ReadyTask { run: "0-1".into(), step: 0, attempt: 1, state };
        let dispatch = Dispatch { step: task.step, attempt: task.attempt };
        assert_eq!(decode_task(&encode_task(&task.run, dispatch, &task.state)).unwrap(), task);
    }
}
