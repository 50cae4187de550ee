//! `container = {…}`: what an OS-image step runs.

use super::Sp;

/// What a `container = {…}` step runs. `command` (then the step's `args`) replaces
/// the image's CMD; the image's own ENTRYPOINT stays unless `entrypoint` is given.
#[derive(Debug, Clone)]
pub struct ContainerStep {
    pub image: Sp<String>,
    pub command: Option<Vec<Sp<String>>>,
    pub entrypoint: Option<Vec<Sp<String>>>,
    /// Added to the step's `env` (which wins on a clash).
    pub env: Vec<(Sp<String>, Sp<String>)>,
    pub workdir: Option<Sp<String>>,
    /// `uid[:gid]` or a name the image knows; default: the daemon's uid:gid.
    pub user: Option<Sp<String>>,
    /// `network = true`: a network (the engine's default bridge) instead of none.
    pub network: bool,
    /// `read_only_root = false`: the image's root filesystem writable.
    pub read_only_root: bool,
}
