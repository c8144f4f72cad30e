//! Enrollment: the certificate request written into the NodeFill status
//! until the operator answers it in the spec.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::identity::Request;
use super::is_not_found;
use super::report;
use super::reporter::Reporter;
use super::watch::FillRx;
use crate::retry::{self, Backoff};
use crate::tls;

/// Writes the request until the operator answers it; `None` on shutdown.
pub(super) async fn wait_for_identity(
    reporter: &mut Reporter,
    request: &Request,
    fill_rx: &mut FillRx,
    shutdown: &CancellationToken,
) -> Option<tls::NodeIdentity> {
    // Polls at the policy's first wait; a refused write waits longer.
    let mut backoff = Backoff::new(retry::ENROLL);
    let mut wait = retry::ENROLL.min;
    let mut written: Option<Instant> = None;
    let mut refused: Option<String> = None;
    loop {
        let current = fill_rx.borrow_and_update().clone();
        if let Some(nf) = &current {
            reporter.interval = report::report_interval(nf.spec.report_interval_seconds);
            if let Some(issued) = &nf.spec.identity {
                match request.accept(issued) {
                    Ok(id) => return Some(id),
                    Err(e) => {
                        let msg = e.to_string();
                        if refused.as_deref() != Some(msg.as_str()) {
                            debug!(error = %msg, "spec.identity is not (yet) the answer to our request");
                            refused = Some(msg);
                        }
                    }
                }
            }
        }
        // (Re)write the request when the NodeFill appears, and as a
        // heartbeat while we wait.
        let due = written.is_none_or(|w| w.elapsed() >= reporter.interval);
        if current.is_some() && due {
            match reporter.write_request().await {
                Ok(()) => {
                    written = Some(Instant::now());
                    backoff.reset();
                    wait = retry::ENROLL.min;
                }
                Err(e) if is_not_found(&e) => {
                    debug!("NodeFill not there yet");
                }
                Err(e) => {
                    wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "cannot write the certificate request");
                }
            }
        } else if current.is_none() {
            written = None;
        }
        tokio::select! {
            _ = fill_rx.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}
