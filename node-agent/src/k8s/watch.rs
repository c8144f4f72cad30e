//! The NodeFill watch: the latest version of this node's NodeFill, kept in
//! a watch channel that feeds readiness too.

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use peerfill_crds::nodefill::NodeFill;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::metrics;

/// The NodeFill as last seen by the watch (`None`: not there).
pub(super) type FillRx = watch::Receiver<Option<NodeFill>>;

/// Keeps the latest version of NodeFill `node` in a watch channel: one
/// watch with a field selector on the name, relisting (after a 410 Gone or
/// a broken stream) with backoff.
pub(super) fn watch_nodefill(
    api: Api<NodeFill>,
    node: String,
    stop: CancellationToken,
    health: metrics::Health,
) -> FillRx {
    let (tx, rx) = watch::channel(None);
    let span = info_span!("nodefill_watch", node = %node);
    let watch = async move {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut listed = false;
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.cancelled() => return,
            };
            let Some(ev) = ev else { return };
            // Readiness follows the watch: any event (a re-list included)
            // shows the API server answers; an error shows it does not.
            match &ev {
                Ok(_) => health.set_watch_alive(std::time::Instant::now()),
                Err(e) => health.set_watch_down(std::time::Instant::now(), e.to_string()),
            }
            match ev {
                Ok(Event::Init) => listed = false,
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) if o.name_any() == node => {
                    listed = true;
                    tx.send_replace(Some(o));
                }
                Ok(Event::InitDone) if !listed => {
                    tx.send_replace(None);
                }
                Ok(Event::Delete(o)) if o.name_any() == node => {
                    tx.send_replace(None);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "watching the NodeFill failed; retrying"),
            }
        }
    };
    tokio::spawn(watch.instrument(span));
    rx
}
