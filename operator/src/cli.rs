//! Command line (charts/peerfill/README.md "Operator").

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

use crate::leader::Timing;

/// The peerfill operator: Distributions -> per-node work -> status.
#[derive(Parser, Debug, Clone)]
#[command(name = "peerfill-operator", version, about)]
pub struct Args {
    /// Log lines as text or JSON (filter with RUST_LOG).
    #[arg(long, value_enum, default_value = "text", env = "PEERFILL_LOG_FORMAT")]
    pub log_format: peerfill_agent::logging::LogFormat,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint (every
    /// replica).
    #[arg(long, default_value = "0.0.0.0:9463")]
    pub metrics: SocketAddr,
    /// Bind the metrics endpoint to this IP instead of `--metrics`'s (the
    /// port stays `--metrics`'s). The chart passes the pod IP, so the
    /// endpoint is not exposed on every interface of the pod.
    #[arg(long)]
    pub metrics_bind_address: Option<IpAddr>,
    /// Namespace of the leader Lease and of the CA Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "peerfill-operator")]
    pub leader_election_lease: String,
    /// How long a leader's Lease is valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// How long the leader keeps trying to renew before it gives up (and
    /// exits, so its pod restarts).
    #[arg(long, default_value_t = 10)]
    pub renew_deadline_seconds: u64,
    /// Time between two attempts to acquire or renew.
    #[arg(long, default_value_t = 2)]
    pub retry_period_seconds: u64,
    /// Name of the CA Secret in the leader election namespace.
    #[arg(long, env = "PEERFILL_CA_SECRET", default_value = "peerfill-ca")]
    pub ca_secret: String,
    /// Identity in the Lease; default POD_NAME, else hostname-pid.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Accept http origins on loopback, link-local (169.254.0.0/16,
    /// fe80::/10), unspecified and cloud metadata addresses, and
    /// `localhost`. Off by default: such a URL would let any Distribution
    /// author reach those addresses from every node. RFC 1918 addresses are
    /// always accepted.
    #[arg(
        long,
        env = "PEERFILL_ALLOW_PRIVATE_ORIGINS",
        value_parser = clap::builder::FalseyValueParser::new(),
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_private_origins: bool,
}

impl Args {
    /// Where the metrics endpoint binds: `--metrics`, with its IP replaced
    /// by `--metrics-bind-address` if given.
    pub fn metrics_addr(&self) -> SocketAddr {
        match self.metrics_bind_address {
            Some(ip) => SocketAddr::new(ip, self.metrics.port()),
            None => self.metrics,
        }
    }

    /// The Lease holder identity of this replica.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "peerfill-operator".into());
                format!("{host}-{}", std::process::id())
            })
    }

    /// Election timing, checked as client-go does: the lease outlives the
    /// renew deadline, which outlives the retry period.
    pub fn timing(&self) -> Result<Timing, String> {
        let (lease, renew, retry) = (
            self.lease_duration_seconds,
            self.renew_deadline_seconds,
            self.retry_period_seconds,
        );
        if retry == 0 || renew <= retry || lease <= renew {
            return Err(format!(
                "need lease duration ({lease}s) > renew deadline ({renew}s) > retry period ({retry}s) > 0"
            ));
        }
        Ok(Timing {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_command_line_parses() {
        let a = Args::try_parse_from([
            "peerfill-operator",
            "--metrics",
            "0.0.0.0:9463",
            "--leader-election-namespace",
            "peerfill-system",
            "--leader-election-lease",
            "peerfill-operator",
        ])
        .unwrap();
        assert_eq!(a.leader_election_namespace, "peerfill-system");
        assert_eq!(a.timing().unwrap().lease_duration, Duration::from_secs(15));
        assert_eq!(a.metrics_addr(), "0.0.0.0:9463".parse().unwrap());
        let pinned = Args::try_parse_from([
            "x",
            "--metrics",
            "0.0.0.0:9463",
            "--metrics-bind-address",
            "fd00::7",
        ])
        .unwrap();
        assert_eq!(pinned.metrics_addr(), "[fd00::7]:9463".parse().unwrap());

        let bad = Args::try_parse_from([
            "x",
            "--lease-duration-seconds",
            "5",
            "--renew-deadline-seconds",
            "5",
        ])
        .unwrap();
        assert!(bad.timing().is_err());
        assert!(
            !a.allow_private_origins,
            "private origins are refused by default"
        );
        let allow = Args::try_parse_from(["peerfill-operator", "--allow-private-origins"]).unwrap();
        assert!(allow.allow_private_origins);
    }
}
