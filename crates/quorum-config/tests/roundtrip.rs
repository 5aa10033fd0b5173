//! Property: generated disks survive `to_xml` → `parse_str` unchanged, and
//! formatting is idempotent.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use quorum_config::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,12}", "[ -~\t\n]{0,8}", "\\PC{0,8}"]
}

fn path(replica: usize, depth: usize) -> impl Strategy<Value = PathBuf> {
    ("[a-zA-Z0-9 '&<>\"._-]{1,8}", "[a-zA-Z0-9 ._-]{0,6}")
        .prop_map(move |(dir, name)| PathBuf::from(format!("/{dir}/r{replica}-{depth}{name}")))
}

fn source(replica: usize, depth: usize) -> impl Strategy<Value = Source> {
    prop_oneof![
        path(replica, depth).prop_map(|path| Source::File { path }),
        path(replica, depth).prop_map(|dev| Source::Block { dev }),
        (
            proptest::option::of(text()),
            "[a-z0-9.-]{1,10}",
            1u16..,
            proptest::option::of(any::<bool>())
        )
            .prop_map(move |(e, h, port, tls)| Source::Nbd {
                export: e,
                host: NbdHost::Tcp {
                    name: format!("{h}.r{replica}-{depth}"),
                    port,
                },
                tls,
            }),
        (proptest::option::of(text()), path(replica, depth)).prop_map(|(e, socket)| Source::Nbd {
            export: e,
            host: NbdHost::Unix { socket },
            tls: None,
        }),
    ]
}

/// One layer at `depth` of replica `replica`, with up to `below` layers under it.
fn layer(replica: usize, depth: usize, below: usize) -> BoxedStrategy<StorageSource> {
    let index = proptest::option::of(Just(u32::try_from(replica * 10 + depth + 1).unwrap()));
    let end = prop_oneof![Just(Backing::Unspecified), Just(Backing::End)];
    let raw = (index.clone(), source(replica, depth), end.clone()).prop_map(
        |(index, source, backing)| StorageSource {
            index,
            format: ImageFormat::Raw,
            source,
            backing,
        },
    );
    let backing = if below == 0 {
        end.boxed()
    } else {
        prop_oneof![
            end,
            layer(replica, depth + 1, below - 1).prop_map(|l| Backing::Store(Box::new(l)))
        ]
        .boxed()
    };
    let qcow2 = (index, source(replica, depth), backing).prop_map(|(index, source, backing)| {
        StorageSource {
            index,
            format: ImageFormat::Qcow2,
            source,
            backing,
        }
    });
    prop_oneof![raw, qcow2].boxed()
}

fn disk() -> impl Strategy<Value = DiskConfig> {
    (1usize..=4)
        .prop_flat_map(|n| {
            let replicas: Vec<_> = (0..n).map(|i| layer(i, 0, 2)).collect();
            (replicas, 1..=u32::try_from(n).unwrap())
        })
        .prop_flat_map(|(replicas, threshold)| {
            let can_blkverify = replicas.len() == 2 && threshold == 2;
            (
                Just(replicas),
                Just(threshold),
                proptest::option::of(text()),
                prop_oneof![Just(ReadPattern::Quorum), Just(ReadPattern::Fifo)],
                0u8..3,
                any::<bool>().prop_map(move |b| b && can_blkverify),
                (
                    "(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]{1,6}",
                    proptest::option::of("[a-z]{1,6}"),
                ),
                any::<bool>(),
                proptest::option::of(text()),
                proptest::option::of(text()),
            )
        })
        .prop_map(
            |(
                replicas,
                threshold,
                name,
                read_pattern,
                mode,
                blkverify,
                (dev, bus),
                shareable,
                serial,
                alias,
            )| {
                // mode: 0 plain, 1 rewrite_corrupted, 2 readonly (the two exclude each other)
                let rewrite_corrupted = mode == 1 && !blkverify;
                DiskConfig {
                    device: DeviceKind::Disk,
                    driver: DriverOptions {
                        name,
                        read_pattern,
                        rewrite_corrupted,
                        blkverify,
                    },
                    threshold,
                    replicas,
                    target: Target { dev, bus },
                    readonly: mode == 2,
                    shareable,
                    serial,
                    alias,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn to_xml_then_parse_gives_the_same_disk(cfg in disk()) {
        let xml = to_xml(&cfg);

        let back = parse_str(&xml, "gen.xml", Path::new("/"), None);

        prop_assert_eq!(back, Ok(cfg), "xml:\n{}", xml);
    }

    #[test]
    fn to_xml_is_idempotent(cfg in disk()) {
        let once = to_xml(&cfg);

        let twice = to_xml(&parse_str(&once, "gen.xml", Path::new("/"), None).unwrap());

        prop_assert_eq!(once, twice);
    }

    #[test]
    fn blockdev_args_end_with_the_quorum_node(cfg in disk()) {
        let args = qemu::blockdev_args(&cfg);

        prop_assert_eq!(&args.last().unwrap()["driver"], "quorum");
    }

    #[test]
    fn blockdev_node_names_are_unique_and_short(cfg in disk()) {
        let args = qemu::blockdev_args(&cfg);

        let names: Vec<&str> = args.iter().map(|a| a["node-name"].as_str().unwrap()).collect();
        let unique: std::collections::HashSet<&&str> = names.iter().collect();
        prop_assert_eq!(unique.len(), names.len());
        prop_assert!(names.iter().all(|n| n.len() < 32));
    }
}
