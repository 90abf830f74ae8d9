//! Dispatch one `exec` job over the native API, print its output as it comes, then its
//! result.
//!
//! ```text
//! cargo run -p runnel-client --example dispatch -- \
//!     <broker host:port> <ca fingerprint> <owner> <program> [args...]
//! ```
//!
//! The API key comes from `RUNNEL_KEY` (never a flag: flags show in `ps`). With the
//! README's "Quickstart by hand" done (a broker, tenant `acme` with key `$ADMIN`, a
//! runner of owner `alice`; the fingerprint is the one in step 2's enroll command):
//!
//! ```text
//! RUNNEL_KEY=$ADMIN cargo run -p runnel-client --example dispatch -- \
//!     127.0.0.1:7443 sha256:… alice echo hello
//! ```

use std::io::Write;
use std::process::ExitCode;

use runnel_client::{Client, exec};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dispatch: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, fingerprint, owner, program, rest @ ..] = args.as_slice() else {
        return Err("usage: dispatch <broker host:port> <ca fingerprint> <owner> <program> \
                    [args...] (the key in RUNNEL_KEY)"
            .into());
    };
    let key = std::env::var("RUNNEL_KEY").map_err(|_| "set RUNNEL_KEY to an API key")?;
    let client = Client::connect(addr, fingerprint, &key).await?;
    let args: Vec<&str> = rest.iter().map(String::as_str).collect();
    let mut job = client.dispatch(exec(owner, program, &args)).await?;
    eprintln!("job {} {:?}", job.id(), job.job().state);
    let mut stdout = std::io::stdout();
    while let Some(chunk) = job.output().await? {
        stdout.write_all(&chunk)?;
        stdout.flush()?;
    }
    let ended = job.result().await?;
    eprintln!("job {} {:?} exit {:?} {}", ended.id, ended.state, ended.exit_code, ended.message);
    let ok = ended.state == runnel_client::JobState::Succeeded;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
