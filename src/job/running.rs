//! Stages 7-9 of a job: the container runs. Line 1 of its stdin is the
//! credential, the rest the prompt; each stdout line updates the stream
//! state, shows progress and decides whether the job goes on (token cap,
//! refused login, result). This stage must not count usage or audit: what
//! it saw is handed to the record stage.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::prepare::Prepared;
use super::start::Started;
use super::{Cancel, JobEvent, JobSpec, Progress};
use crate::claude::stream::{Event, PartialUsage, StreamState};
use crate::docker::container::{self, Exited, KillReason, Verdict};
use crate::docker::egress::{EgressReport, Proxy};
use crate::docker::DockerError;

/// What a run of the container leaves for the record.
pub(super) struct Ran {
    /// The container's ending, or the engine's failure mid-job.
    pub run: Result<Exited, DockerError>,
    pub state: StreamState,
    pub prompt_sha: String,
    /// `subscription` or `api-key`: the credential itself is gone.
    pub credential_kind: &'static str,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// What the job's proxy allowed and refused.
    pub egress: EgressReport,
}

/// Run the created container to its end.
pub(super) async fn run(
    prepared: Prepared,
    spec: &JobSpec,
    started: Started,
    progress: &Arc<dyn Progress>,
    cancel: &Cancel,
) -> Ran {
    let Prepared {
        credential,
        docker,
        proxy,
        hold,
        ..
    } = prepared;
    let Started {
        created,
        prompt_sha,
        started_at,
        t0,
    } = started;
    let mut stdin = credential.stdin_line();
    let credential_kind = credential.kind.name();
    drop(credential);
    stdin.extend_from_slice(&spec.prompt);
    let mut state = StreamState::default();
    let max_tokens = spec.max_tokens;
    let p = progress.clone();
    let run = container::run_created(
        &docker,
        created,
        stdin,
        hold,
        spec.timeout,
        async {
            cancel.cancelled().await;
            p.job_event(JobEvent::Cancelling);
        },
        |line| on_line(&mut state, line, max_tokens, progress.as_ref()),
    )
    .await;
    let duration_ms = elapsed_ms(t0);
    // The container has stopped: nothing can use the proxy any more.
    let egress = proxy.as_ref().map(Proxy::report).unwrap_or_else(EgressReport::open);
    drop(proxy);
    if let Ok(exited) = &run {
        if let container::Ending::Killed(KillReason::Timeout) = &exited.run.ending {
            progress.job_event(JobEvent::Killing(KillReason::Timeout));
        }
    }
    Ran {
        run,
        state,
        prompt_sha,
        credential_kind,
        started_at,
        duration_ms,
        egress,
    }
}

fn elapsed_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

/// One stdout line: update the state, show progress, and decide whether the
/// job goes on.
fn on_line(state: &mut StreamState, line: &str, max_tokens: u64, progress: &dyn Progress) -> Verdict {
    let event = state.feed(line);
    if matches!(event, Event::Init { .. } | Event::Result(_)) {
        tracing::debug!(
            event = if matches!(event, Event::Result(_)) {
                "result"
            } else {
                "init"
            },
            "stream"
        );
    }
    show(&event, max_tokens, progress);
    if !event.is_raw_api_event() {
        progress.job_event(JobEvent::StreamLine(line));
    }
    // A refused credential stays refused: end the job now instead of
    // after Claude Code's ten retries.
    if let Event::Retry(r) = &event {
        if r.is_auth_failure() {
            progress.job_event(JobEvent::Killing(KillReason::AuthFailed));
            return Verdict::Kill(KillReason::AuthFailed);
        }
    }
    if state.tokens_so_far() > max_tokens {
        progress.job_event(JobEvent::Killing(KillReason::TokenCap));
        return Verdict::Kill(KillReason::TokenCap);
    }
    // Success or failure is the result's to say; nothing after it counts.
    if matches!(event, Event::Result(_)) {
        return Verdict::Done;
    }
    Verdict::Continue
}

/// The progress event a stream event stands for, if any.
fn show(event: &Event, max_tokens: u64, progress: &dyn Progress) {
    match event {
        Event::Init { model } => progress.job_event(JobEvent::Init {
            model: model.as_deref(),
        }),
        Event::Retry(r) => progress.job_event(JobEvent::Retry(r)),
        Event::RateLimit(r) => progress.job_event(JobEvent::RateLimit(r)),
        Event::Invalid(l) => progress.job_event(JobEvent::InvalidLine(l)),
        Event::Message {
            tokens_so_far, turns, ..
        }
        | Event::Partial(Some(PartialUsage {
            tokens_so_far, turns, ..
        })) => progress.job_event(JobEvent::Tokens {
            so_far: *tokens_so_far,
            turns: *turns,
            max: max_tokens,
        }),
        Event::Result(_) | Event::Other | Event::Partial(None) => {}
    }
}
