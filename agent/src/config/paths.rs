//! The files and directories a config names, compared as the kernel will resolve
//! them, so that one path cannot serve two purposes: the admin socket must never be
//! the private key, the config file, the join token or anything in the state dir,
//! however the path is spelt (`/a/./b`, `/a//b`, `/a/x/../b`, a symlink).
//!
//! This module only reads the file system (to resolve symlinks); it never writes.

use std::path::{Component, Path, PathBuf};

/// `path` as the kernel would reach it: made absolute against the current
/// directory, symlinks in its existing part resolved, and `.`, `..` and repeated
/// slashes in the part that does not exist yet removed lexically.
pub(super) fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let components: Vec<Component<'_>> = absolute.components().collect();
    for existing in (1..=components.len()).rev() {
        let head: PathBuf = components[..existing].iter().collect();
        if let Ok(mut resolved) = std::fs::canonicalize(&head) {
            for c in &components[existing..] {
                match c {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => resolved.push(name),
                    Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                }
            }
            return resolved;
        }
    }
    absolute
}

/// The files the agent writes in its state dir (controller mode): its
/// identity, its control-plane key and certificate, the controller's CA and
/// the cached netmap. Each is written through a temporary file of
/// [`temp_name`]. A configured file there would be overwritten.
pub(crate) const STATE_FILES: [&str; 5] = [
    "controller.json",
    "control.key",
    "control.crt",
    "ca.crt",
    "netmap.json",
];

/// The temporary file a state file is written through before it is renamed
/// into place; unique per file, so writing one never touches another.
pub(crate) fn temp_name(file: &str) -> String {
    format!(".{file}.skymesh-tmp")
}

/// The first file the agent writes in `state_dir` that `path` would be, if
/// any (its name, for the error).
pub(super) fn agent_file_collision(path: &Path, state_dir: &Path) -> Option<String> {
    let path = resolve(path);
    STATE_FILES
        .iter()
        .flat_map(|f| [f.to_string(), temp_name(f)])
        .find(|f| resolve(&state_dir.join(f)) == path)
}

/// A configured path the admin socket must not take over.
pub(super) struct Claimed<'a> {
    /// The config key that names it, like `interface.private_key_file`.
    pub key: &'a str,
    pub path: &'a Path,
    /// A directory the agent keeps files in: the socket may not go inside it either.
    pub is_dir: bool,
}

/// The first claimed path the socket would replace, if any: equal to it once both
/// are resolved, or inside it for a directory.
pub(super) fn socket_collision<'a>(
    socket: &Path,
    claimed: &'a [Claimed<'a>],
) -> Option<&'a Claimed<'a>> {
    let socket = resolve(socket);
    claimed.iter().find(|c| {
        let other = resolve(c.path);
        socket == other || (c.is_dir && socket.starts_with(&other))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_path_resolve_alike() {
        let dir = std::env::temp_dir().join(format!("skymesh-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        std::fs::write(dir.join("private.key"), "k").expect("file");
        std::os::unix::fs::symlink(dir.join("private.key"), dir.join("link")).ok();
        std::os::unix::fs::symlink(dir.join("sub"), dir.join("sublink")).ok();
        let want = resolve(&dir.join("private.key"));
        let d = dir.display();
        for spelling in [
            format!("{d}/./private.key"),
            format!("{d}//private.key"),
            format!("{d}/sub/../private.key"),
            format!("{d}/sublink/../private.key"),
            format!("{d}/link"),
        ] {
            assert_eq!(resolve(Path::new(&spelling)), want, "{spelling}");
        }
        // Paths that do not exist yet are normalised too.
        assert_eq!(
            resolve(Path::new(&format!("{d}/new/./x//y/../z"))),
            resolve(&dir).join("new/x/z")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
