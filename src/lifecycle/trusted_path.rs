//! Whether a start may follow the state directory's path: no symlink on it that another user
//! planted.
//!
//! Auto-start creates `sockets/` in the state directory and starts a daemon there, as the user
//! who runs the command. A symlink on the way that another user made, or could have put in
//! place, would send that daemon (root's, under `sudo`) into a directory of their choosing. A
//! symlink of one's own, or root's, in a directory that only its owner (oneself or root) can
//! change, is a spelling of one's own directory, and is followed.
//!
//! The walk ends at the directory the path names; the start then opens it and checks, on that
//! descriptor, that it is the same directory (device and inode): a link swapped after the walk
//! is caught there.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::paths::FileIdentity;
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

/// The directory `path` (absolute) names, walked link by link: its identity when every symlink
/// on the way is trusted, or why a start must not follow it. A symlink is not trusted when it
/// belongs to another user than this one or root, or when the directory that holds it belongs
/// to another user than this one or root, or can be written by group or others without a
/// sticky bit. `Ok(None)` when a part of the path is missing: the start's own checks then find
/// the directory missing.
pub(crate) fn trusted_directory(path: &Path) -> Result<Option<FileIdentity>, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
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
        let Ok(metadata) = std::fs::symlink_metadata(&next) else {
            return Ok(None);
        };
        if !metadata.file_type().is_symlink() {
            at = next;
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(format!(
                "the path passes through more than {MAX_LINKS} symlinks"
            ));
        }
        let trusted = |uid: u32| uid == own_uid() || uid == 0;
        if !trusted(metadata.uid()) {
            return Err(format!(
                "the symlink {} on the path belongs to another user (uid {})",
                next.display(),
                metadata.uid()
            ));
        }
        let Ok(parent) = std::fs::metadata(&at) else {
            return Ok(None);
        };
        let sticky = parent.mode() & 0o1000 != 0;
        if !trusted(parent.uid()) || (parent.mode() & 0o022 != 0 && !sticky) {
            return Err(format!(
                "the symlink {} on the path sits in {}, which another user can change (owner uid {}, mode {:o})",
                next.display(),
                at.display(),
                parent.uid(),
                parent.mode() & 0o7777
            ));
        }
        let Ok(target) = std::fs::read_link(&next) else {
            return Ok(None);
        };
        let mut target: Vec<Step> = steps(&target).collect();
        target.reverse();
        todo.extend(target);
    }
    Ok(std::fs::metadata(&at).ok().map(|m| FileIdentity::of(&m)))
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
    fn own_links_are_followed_and_links_others_can_change_are_not() {
        let dir = scratch("own");
        std::fs::create_dir(dir.join("repo")).unwrap();
        std::os::unix::fs::symlink(dir.join("repo"), dir.join("link")).unwrap();
        std::os::unix::fs::symlink("repo/../link", dir.join("relative")).unwrap();
        std::fs::create_dir(dir.join("repo/.heddle")).unwrap();
        let repo = FileIdentity::following(&dir.join("repo/.heddle")).unwrap();
        assert_eq!(trusted_directory(&dir.join("link/.heddle")), Ok(Some(repo)));
        assert_eq!(
            trusted_directory(&dir.join("relative/.heddle")),
            Ok(Some(repo))
        );
        assert_eq!(trusted_directory(&dir.join("missing/.heddle")), Ok(None));
        let why = trusted_directory(Path::new("link/.heddle")).unwrap_err();
        assert!(why.contains("not an absolute path"), "{why}");

        // Others can write the directory that holds the link: anyone could have put it there.
        for mode in [0o777, 0o775, 0o757] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let why = trusted_directory(&dir.join("link/.heddle")).unwrap_err();
            assert!(
                why.contains("which another user can change"),
                "{mode:o}: {why}"
            );
        }
        // The sticky bit keeps others from replacing what they do not own.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(trusted_directory(&dir.join("link/.heddle")), Ok(Some(repo)));

        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        let why = trusted_directory(&dir.join("loop/.heddle")).unwrap_err();
        assert!(why.contains("more than 40 symlinks"), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
