//! Property tests of the pidfile parser against an independent definition of "canonical".

use proptest::prelude::*;
use tower_local_daemon::Pidfile;

/// Canonical, defined independently of the parser: the bytes are exactly what formatting some
/// pid in `1..=i32::MAX` and some `u64` start time gives. (`str::parse` accepts `+` and leading
/// zeros; formatting back rejects them.)
fn is_canonical(bytes: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.split('\n');
    let pid: u64 = lines.next()?.parse().ok()?;
    let _marker = lines.next()?;
    let started_at: u64 = lines.next()?.parse().ok()?;
    if pid == 0 || pid > i32::MAX as u64 {
        return None;
    }
    let rendered = format!("{pid}\nheddle-agent\n{started_at}\n");
    (rendered.as_bytes() == bytes).then_some((pid as u32, started_at))
}

fn canonical() -> impl Strategy<Value = Vec<u8>> {
    (1..=i32::MAX as u32, any::<u64>())
        .prop_map(|(pid, started_at)| Pidfile::new(pid, started_at).render().into_bytes())
}

/// Bytes that pidfiles go wrong with.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(b"0123456789\n+- \r\0a".to_vec()),
        1 => any::<u8>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, u8),
    Delete(usize),
    Replace(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Delete(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Replace(i, b) if len > 0 => bytes[i % len] = b,
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Pidfile::parse(&bytes);
    }

    #[test]
    fn canonical_pidfiles_are_accepted(bytes in canonical()) {
        let (pid, started_at) = is_canonical(&bytes).expect("rendered pidfiles are canonical");
        prop_assert_eq!(Pidfile::parse(&bytes), Ok(Pidfile::new(pid, started_at)));
    }

    #[test]
    fn mutations_are_accepted_exactly_when_canonical(
        bytes in canonical(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mutated = apply(bytes, &mutations);
        match is_canonical(&mutated) {
            Some((pid, started_at)) => {
                prop_assert_eq!(Pidfile::parse(&mutated), Ok(Pidfile::new(pid, started_at)))
            }
            None => prop_assert!(Pidfile::parse(&mutated).is_err(), "{:?}", mutated),
        }
    }
}
