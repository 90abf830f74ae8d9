//! The NAT lab (`tests/netlab/netlab.sh`) from Rust: namespaces up on creation, down on
//! drop (a failing test tears them down too), commands run inside one of them.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The broker namespace's address (the runner dials it through the NAT).
pub const BROKER_IP: &str = "10.77.2.2";
/// The runner's private address (the broker must never see it).
pub const RUNNER_IP: &str = "10.77.1.2";
/// The NAT's outside address (what the broker sees).
pub const NAT_OUTSIDE_IP: &str = "10.77.2.1";

/// Which namespace.
#[derive(Debug, Clone, Copy)]
pub enum Ns {
    /// The runner, on the private subnet.
    Runner,
    /// The NAT router.
    Nat,
    /// The broker.
    Broker,
}

impl Ns {
    fn letter(self) -> &'static str {
        match self {
            Ns::Runner => "r",
            Ns::Nat => "n",
            Ns::Broker => "b",
        }
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("netlab/netlab.sh")
}

/// A running lab.
pub struct Lab {
    prefix: String,
}

impl Lab {
    /// Builds the lab, or says in one line (`SKIPPED: NAT lab unavailable: why`, which
    /// `.ci/run` counts and prints at the end) why it cannot and answers None.
    pub fn up() -> Option<Self> {
        let missing: Vec<&str> = ["ip", "iptables", "conntrack", "tc"]
            .into_iter()
            .filter(|b| !crate::installed(b))
            .collect();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let prefix = format!("n{:x}", (std::process::id() ^ nanos) & 0xff_ffff);
        let why = if !missing.is_empty() {
            Some(format!("missing {} (Debian: iproute2 iptables conntrack)", missing.join(", ")))
        } else {
            let out = Command::new("bash").arg(script()).args(["up", &prefix]).output();
            match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "netlab.sh up failed (root and network namespaces needed): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Some(format!("cannot run netlab.sh: {e}")),
            }
        };
        match why {
            None => Some(Self { prefix }),
            Some(why) => {
                let _ = Command::new("bash").arg(script()).args(["down", &prefix]).status();
                eprintln!("SKIPPED: NAT lab unavailable: {why}");
                None
            }
        }
    }

    /// A command to run inside `ns` (`ip netns exec`).
    pub fn command(&self, ns: Ns, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &format!("{}{}", self.prefix, ns.letter()), program]);
        c.kill_on_drop(true);
        c
    }

    /// Runs `netlab.sh <cmd> <prefix> <args>` (rebind, expire, impair, delay-line), which
    /// must succeed.
    pub fn lab(&self, cmd: &str, args: &[&str]) -> Output {
        let out = self.try_lab(cmd, args);
        assert!(out.status.success(), "netlab.sh {cmd}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// Runs `netlab.sh <cmd> <prefix> <args>`; the caller looks at how it went.
    pub fn try_lab(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(&self.prefix)
            .args(args)
            .output()
            .expect("netlab.sh runs")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).args(["down", &self.prefix]).status();
    }
}
