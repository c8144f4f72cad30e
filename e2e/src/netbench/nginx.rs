//! The origin: Debian's nginx with its own config file, in the origin
//! namespace (not the system service). One process (`master_process off`),
//! sendfile, an access log of `$uri $status $body_bytes_sent` per request:
//! the origin-bytes figure is the sum of `$body_bytes_sent` of the artifact's
//! requests (payload only, no HTTP or TCP/IP headers).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::procs::{NsProc, run_in};
use super::testbed::ORIGIN_IP;
use super::{Deadline, NetbenchError, Result, io_err, sleep};

pub struct Nginx {
    proc: NsProc,
    access_log: PathBuf,
}

/// Where nginx is installed by Debian's `nginx-light` / `nginx`.
pub const NGINX_BIN: &str = "/usr/sbin/nginx";

impl Nginx {
    /// Starts nginx in `ns` serving `root` on 198.18.0.1:80, and waits until
    /// it answers.
    pub fn start(ns: &str, dir: &Path, root: &Path) -> Result<Nginx> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let access_log = dir.join("access.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, root, &access_log))
            .map_err(io_err(format!("writing {}", conf.display())))?;
        let conf_s = conf.to_string_lossy().into_owned();
        let prefix = format!("{}/", dir.display());
        let err_log = dir.join("error.log").to_string_lossy().into_owned();
        let proc = NsProc::spawn(
            "nginx",
            ns,
            Path::new(NGINX_BIN),
            &["-p", &prefix, "-c", &conf_s, "-e", &err_log],
            &[],
            &dir.join("nginx.out"),
        )?;
        let mut nginx = Nginx { proc, access_log };
        nginx.wait_ready(ns)?;
        Ok(nginx)
    }

    fn wait_ready(&mut self, ns: &str) -> Result<()> {
        let deadline = Deadline::after(Duration::from_secs(10));
        let url = format!("http://{ORIGIN_IP}/healthz");
        loop {
            if let Some(exit) = self.proc.try_reap()? {
                return Err(NetbenchError::NodeFailed {
                    node: "nginx".into(),
                    reason: format!("exited with {} at start (see error.log)", exit.code),
                });
            }
            if run_in(
                ns,
                "curl",
                &["-s", "-o", "/dev/null", "--max-time", "1", &url],
            )
            .is_ok()
            {
                return Ok(());
            }
            if deadline.expired() {
                return Err(NetbenchError::Timeout {
                    what: "nginx start".into(),
                    secs: 10.0,
                });
            }
            sleep(Duration::from_millis(50))?;
        }
    }

    /// Current length of the access log: requests logged later are after it.
    pub fn log_mark(&self) -> Result<u64> {
        match std::fs::metadata(&self.access_log) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("reading the access log")(e)),
        }
    }

    /// Response body bytes of requests for `uri` logged after `mark`.
    pub fn body_bytes_since(&self, mark: u64, uri: &str) -> Result<u64> {
        let log = std::fs::read(&self.access_log).map_err(io_err("reading the access log"))?;
        let tail = log.get(mark as usize..).unwrap_or_default();
        Ok(sum_body_bytes(&String::from_utf8_lossy(tail), uri))
    }

    pub fn usage(&self) -> super::procs::Usage {
        self.proc.usage()
    }

    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(3));
    }
}

/// nginx.conf: everything under `dir`, nothing of the system's config.
fn config(dir: &Path, root: &Path, access_log: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    log_format bytes '$uri $status $body_bytes_sent';
    access_log {log} bytes;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {ORIGIN_IP}:80;
        root {root};
        location = /healthz {{ return 204; }}
    }}
}}
"#,
        log = access_log.display(),
        root = root.display(),
    )
}

/// Sum of the third field of access-log lines whose first field is `uri`.
pub fn sum_body_bytes(log: &str, uri: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == uri).then_some(())?;
            f.next()?;
            f.next()?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_bytes_of_one_uri_only() {
        let log = "/artifact.bin 206 4194304\n/healthz 204 0\n/calib.bin 200 999\n\
                   /artifact.bin 200 1000\n/artifact.bin 206 garbage\n";
        assert_eq!(sum_body_bytes(log, "/artifact.bin"), 4194304 + 1000);
        assert_eq!(sum_body_bytes(log, "/calib.bin"), 999);
        assert_eq!(sum_body_bytes("", "/artifact.bin"), 0);
    }

    #[test]
    fn config_keeps_everything_in_its_dir() {
        let c = config(
            Path::new("/w/nginx"),
            Path::new("/w/www"),
            Path::new("/w/nginx/access.log"),
        );
        assert!(c.contains("listen 198.18.0.1:80;"));
        assert!(c.contains("root /w/www;"));
        assert!(c.contains("pid /w/nginx/nginx.pid;"));
        assert!(!c.contains("/var/"), "{c}");
    }
}
