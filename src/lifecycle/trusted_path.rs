//! Whether a start may follow the state directory's path: no symlink on it that another user
//! planted.
//!
//! Auto-start creates `sockets/` in the state directory and starts a daemon there, as the user
//! who runs the command. A symlink on the way that another user made, in a shared directory,
//! would send that daemon (root's, under `sudo`) into a directory of their choosing. A symlink
//! of one's own, or root's, in a directory only its owner can change, is a spelling of one's own
//! directory, and is followed.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::peer::own_uid;

/// How many symlinks a path may pass through, as the kernel allows (`ELOOP` past 40).
const MAX_LINKS: usize = 40;

/// One step of a path being walked.
enum Step {
    Root,
    Parent,
    Name(OsString),
}

fn steps(path: &Path) -> impl Iterator<Item = Step> + '_ {
    path.components().filter_map(|c| match c {
        Component::RootDir => Some(Step::Root),
        Component::ParentDir => Some(Step::Parent),
        Component::Normal(name) => Some(Step::Name(name.to_owned())),
        Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Why a start must not follow `path` (absolute): a symlink on it belongs to another user than
/// this one or root, or sits in a directory that others can write and that has no sticky bit.
/// `None` when every symlink on it is trusted. A part of the path that is missing ends the
/// walk: the start's own checks then find the directory missing.
pub(crate) fn planted_link(path: &Path) -> Option<String> {
    let mut at = PathBuf::from("/");
    let mut todo: Vec<Step> = steps(path).collect();
    todo.reverse();
    let mut links = 0;
    while let Some(step) = todo.pop() {
        let name = match step {
            Step::Root => {
                at = PathBuf::from("/");
                continue;
            }
            Step::Parent => {
                at.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let next = at.join(&name);
        let metadata = std::fs::symlink_metadata(&next).ok()?;
        if !metadata.file_type().is_symlink() {
            at = next;
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Some(format!(
                "the path passes through more than {MAX_LINKS} symlinks"
            ));
        }
        let owner = metadata.uid();
        if owner != own_uid() && owner != 0 {
            return Some(format!(
                "the symlink {} on the path belongs to another user (uid {owner})",
                next.display()
            ));
        }
        let parent = std::fs::metadata(&at).ok()?;
        if parent.mode() & 0o002 != 0 && parent.mode() & 0o1000 == 0 {
            return Some(format!(
                "the symlink {} on the path sits in {}, which others can write and which has no sticky bit",
                next.display(),
                at.display()
            ));
        }
        let target = std::fs::read_link(&next).ok()?;
        let mut target: Vec<Step> = steps(&target).collect();
        target.reverse();
        todo.extend(target);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tld-trusted-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn own_links_are_followed_and_links_in_open_directories_are_not() {
        let dir = scratch("own");
        std::fs::create_dir(dir.join("repo")).unwrap();
        std::os::unix::fs::symlink(dir.join("repo"), dir.join("link")).unwrap();
        std::os::unix::fs::symlink("repo/../link", dir.join("relative")).unwrap();
        assert_eq!(planted_link(&dir.join("link/.heddle")), None);
        assert_eq!(planted_link(&dir.join("relative/.heddle")), None);
        assert_eq!(planted_link(&dir.join("missing/.heddle")), None);

        // Others can write the directory that holds the link: anyone could have put it there.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = planted_link(&dir.join("link/.heddle")).unwrap();
        assert!(why.contains("no sticky bit"), "{why}");
        // The sticky bit keeps others from replacing what they do not own.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(planted_link(&dir.join("link/.heddle")), None);

        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        let why = planted_link(&dir.join("loop/.heddle")).unwrap();
        assert!(why.contains("more than 40 symlinks"), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
