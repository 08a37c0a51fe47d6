//! Child processes the one-command scenarios start (`demo`, `shards`): killed however the
//! command ends.

use std::process::Child;

/// Kills and reaps its child processes when dropped.
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
