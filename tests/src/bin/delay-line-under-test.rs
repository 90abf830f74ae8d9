//! A lossy, slow UDP path in user space, for the NAT lab on kernels without `sch_netem`
//! (`tc qdisc … netem` answers "Specified qdisc kind is unknown" there). It runs in the NAT
//! namespace, where an iptables REDIRECT sends it the runner side's UDP toward the broker
//! (`netlab.sh delay-line`). Each datagram, each way, is dropped with probability LOSS_PCT
//! and otherwise delivered DELAY_MS later; one upstream socket per runner-side address
//! (the broker sees the NAT's outside address, as through MASQUERADE). Replies leave from
//! the socket the REDIRECT delivered to, so conntrack gives them the broker's address back.
//!
//! Configured by environment: LISTEN (the REDIRECT's port, e.g. 0.0.0.0:17443), UPSTREAM
//! (the broker's host:port), DELAY_MS, LOSS_PCT. Runs until killed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;

fn var<T: std::str::FromStr>(name: &str) -> Result<T, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set"))?
        .parse()
        .map_err(|_| format!("{name} is not valid"))
}

/// Whether this datagram is lost.
fn lost(loss_pct: f64) -> bool {
    rand::rng().random_bool((loss_pct / 100.0).clamp(0.0, 1.0))
}

async fn run() -> Result<(), String> {
    let listen: SocketAddr = var("LISTEN")?;
    let upstream: SocketAddr = var("UPSTREAM")?;
    let delay = Duration::from_millis(var("DELAY_MS")?);
    let loss: f64 = var("LOSS_PCT")?;
    let down = Arc::new(UdpSocket::bind(listen).await.map_err(|e| format!("bind {listen}: {e}"))?);
    let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = down.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
        let up = match ups.get(&from) {
            Some(up) => up.clone(),
            None => {
                let up = Arc::new(UdpSocket::bind("0.0.0.0:0").await.map_err(|e| e.to_string())?);
                up.connect(upstream).await.map_err(|e| e.to_string())?;
                // The way back: broker → (delay, loss) → the runner side.
                let (up2, down2) = (up.clone(), down.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = up2.recv(&mut buf).await {
                        if lost(loss) {
                            continue;
                        }
                        let (d, data) = (down2.clone(), buf[..n].to_vec());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = d.send_to(&data, from).await;
                        });
                    }
                });
                ups.insert(from, up.clone());
                up
            }
        };
        if lost(loss) {
            continue;
        }
        let data = buf[..n].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = up.send(&data).await;
        });
    }
}

fn main() -> ExitCode {
    runnel_tests::bin_main("delay-line-under-test", run)
}
