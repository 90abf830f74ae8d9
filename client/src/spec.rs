//! Building a [`DispatchSpec`]: the broker's defaults for everything not given.

use std::collections::BTreeMap;

use runnel_protocol::{DispatchSpec, ExecSpec};

/// A job of `kind` with a handler `payload` for `owner`'s runners; no labels, no
/// explicit runner, the broker's default timeouts, answered once accepted. Set the
/// fields for more (`labels`, `runner_id`, `timeout_ms`, `queue_timeout_ms`, `wait`).
/// An empty `owner` means the key's own (member keys).
pub fn job(owner: &str, kind: &str, payload: Vec<u8>) -> DispatchSpec {
    DispatchSpec {
        owner: owner.to_owned(),
        runner_id: None,
        labels: BTreeMap::new(),
        kind: kind.to_owned(),
        payload,
        timeout_ms: 0,
        queue_timeout_ms: 0,
        wait: false,
    }
}

/// An `exec` job: `program` with `args` on one of `owner`'s runners.
pub fn exec(owner: &str, program: &str, args: &[&str]) -> DispatchSpec {
    let exec = ExecSpec {
        program: program.to_owned(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: Vec::new(),
        cwd: None,
    };
    // An ExecSpec of strings always encodes.
    let payload = postcard::to_allocvec(&exec).unwrap_or_default();
    job(owner, "exec", payload)
}
