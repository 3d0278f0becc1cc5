//! Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/) from what
//! the tests send: CoAP requests, MQTT packets of both versions, upstream
//! frames, config files, control requests, a spool segment and the
//! differential test's Ethernet frames. Deterministic; run again after the
//! tests grow, and commit the result:
//!
//!   cargo run -p m2m-router-tests --example fuzz_seeds

use std::path::{Path, PathBuf};

use bytes::Bytes;
use m2m_router::bridge::Spool;
use m2m_router_tests::frames;
use m2m_router_tests::mqtt::packet;
use m2m_router_tests::packet::{coap, coap_post};

fn corpus_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Seeds are named by an FNV-1a hash of their bytes, as libFuzzer names
/// what it finds (by content), so reruns write the same files.
fn write(dir: &Path, seed: &[u8]) {
    let hash = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    std::fs::write(dir.join(format!("{hash:016x}")), seed).unwrap();
}

fn coap_seeds() {
    let dir = corpus_dir("coap");
    let long_path = {
        let mut o = vec![0xbe];
        o.extend_from_slice(&(2_000u16 - 269).to_be_bytes());
        o.extend(std::iter::repeat_n(b'p', 2_000));
        o
    };
    let hosts: Vec<u8> = [0x31, b'h', 0x01, b'h', 0x81, b'x'].to_vec();
    let messages = [
        coap_post(1, b"21.5"),
        coap(
            0,
            0x02,
            2,
            &[1, 2],
            &[0xb5, b'a', b'l', b'a', b'r', b'm', 0x01, b'x'],
            b"on",
        ),
        coap(1, 0x03, 3, &[], &[0xb1, b'x', 0x11, 50], b"{\"t\":1}"),
        coap(0, 0x01, 4, &[9], &[0xb1, b'x'], b""),
        coap(0, 0x04, 5, &[], &[0xb1, b'x'], b""),
        coap(0, 0x02, 6, &[], &[0x91, 1], b"x"),
        coap(0, 0x01, 7, &[], &[0xd1, 0x16, b'x'], b""),
        coap(0, 0x02, 8, &[], &long_path, b"x"),
        coap(0, 0x02, 9, &[], &hosts, b"x"),
        coap(2, 0x44, 10, &[7], &[], b""),
        coap(3, 0, 11, &[], &[], b""),
        vec![0x40, 0, 0, 12],
        vec![0x40, 0x02, 0, 13, 0xf1],
        // Block1 (option 27): block 0 with more to come, then the last;
        // a Block2 (option 23) GET of block 1.
        coap(
            0,
            0x02,
            14,
            &[],
            &[0xb1, b'x', 0xd1, 0x03, 0x08],
            &[b'b'; 16],
        ),
        coap(0, 0x02, 15, &[], &[0xb1, b'x', 0xd1, 0x03, 0x10], b"end"),
        coap(0, 0x01, 16, &[], &[0xb1, b'x', 0xc1, 0x10], b""),
    ];
    for (i, m) in messages.iter().enumerate() {
        let mut seed = vec![i as u8 % 3];
        seed.extend_from_slice(m);
        write(&dir, &seed);
    }
}

fn mqtt_seeds() {
    let dir = corpus_dir("mqtt_codec");
    let connect_311 = packet(
        0x10,
        &[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'c', b'1'],
    );
    // MQTT 5 CONNECT with Session Expiry and Receive Maximum properties.
    let connect_5 = packet(
        0x10,
        &[
            0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 8, 0x11, 0, 0, 0, 60, 0x21, 0, 10, 0, 2,
            b'c', b'5',
        ],
    );
    let subscribe = packet(0x82, &[0, 1, 0, 3, b'a', b'/', b'#', 1]);
    let subscribe_5 = packet(0x82, &[0, 1, 2, 0x0b, 7, 0, 3, b'a', b'/', b'+', 0x2d]);
    let publish_0 = packet(0x30, &[0, 3, b'a', b'/', b'b', b'h', b'i']);
    let publish_1 = packet(0x33, &[0, 3, b'a', b'/', b'b', 0, 7, b'x']);
    // MQTT 5 PUBLISH: Content Type, Response Topic, a User Property, Topic Alias.
    let publish_5 = packet(
        0x32,
        &[
            0, 3, b'a', b'/', b'b', 0, 9, 22, 0x03, 0, 4, b't', b'e', b'x', b't', 0x08, 0, 1, b'r',
            0x26, 0, 1, b'k', 0, 1, b'v', 0x23, 0, 1, b'p',
        ],
    );
    let unsubscribe = packet(0xa2, &[0, 2, 0, 3, b'a', b'/', b'#']);
    let pingreq = vec![0xc0, 0];
    let puback = packet(0x40, &[0, 7]);
    let disconnect = vec![0xe0, 0];
    for (version, packets) in [
        (
            0u8,
            vec![
                &connect_311,
                &subscribe,
                &publish_0,
                &publish_1,
                &unsubscribe,
            ],
        ),
        (
            1u8,
            vec![&connect_5, &subscribe_5, &publish_5, &puback, &pingreq],
        ),
    ] {
        for (i, p) in packets.iter().enumerate() {
            write(&dir, &[&[version | (i as u8) << 1][..], p].concat());
        }
        let stream: Vec<u8> = packets.iter().flat_map(|p| p.iter().copied()).collect();
        write(
            &dir,
            &[&[version | 0x20][..], &stream, &disconnect].concat(),
        );
    }
}

fn bridge_seeds() {
    let dir = corpus_dir("bridge_frames");
    let connack = vec![0x20, 2, 0, 0];
    let suback = packet(0x90, &[0, 1, 1]);
    let command = packet(
        0x32,
        &[
            0, 15, b's', b'i', b't', b'e', b'/', b'm', b'2', b'm', b'-', b'c', b'm', b'd', b'/',
            b'v', b'1', 0, 5, b'o', b'n',
        ],
    );
    let puback = packet(0x40, &[0, 9]);
    let stream = [
        connack.clone(),
        suback.clone(),
        command.clone(),
        puback.clone(),
    ]
    .concat();
    for (cut, seed) in [
        (0u8, &connack),
        (1, &suback),
        (7, &command),
        (2, &puback),
        (9, &stream),
    ] {
        write(&dir, &[&[cut][..], seed].concat());
    }
}

fn config_seeds() {
    let dir = corpus_dir("config");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    write(
        &dir,
        &std::fs::read(root.join("docs/example.toml")).unwrap(),
    );
    write(&dir, m2m_router_fuzz_policy().as_bytes());
    write(
        &dir,
        b"[[route]]\nname = \"alarms\"\nmatch = \"alarm/*\"\ntopic = \"alarms/{peer}/{path.1}\"\nqos = 1\n\
          [[upstream]]\nname = \"cloud\"\nurl = \"mqtts://broker.example:8883\"\nprefix = \"site-7/\"\n\
          durability = \"disk\"\nspool_dir = \"/var/lib/m2m-router/spool\"\n\
          [downlink]\ncommand_ttl_s = 30\n[mqtt]\nmax_subscriptions = 100\n[control]\nmax_connections = 8\n",
    );
}

/// The fuzz crate's policy (fuzz/src/lib.rs), read from its source so the
/// two cannot drift.
fn m2m_router_fuzz_policy() -> String {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/src/lib.rs"))
            .unwrap();
    let start = lib.find("r#\"").unwrap() + 3;
    let end = lib[start..].find("\"#").unwrap() + start;
    lib[start..end].to_owned()
}

fn control_seeds() {
    let dir = corpus_dir("control");
    for line in [
        r#"{"id":1,"version":1,"command":"status"}"#,
        r#"{"id":2,"version":1,"command":"stats","args":{"peer":"meter"}}"#,
        r#"{"id":3,"version":1,"command":"peer.add","args":{"name":"m2","prefix":["10.1.0.0/24","fd00::/64"],"topic":"x/{peer}/{path}","rate":"10/s","burst":5}}"#,
        r#"{"id":4,"version":1,"command":"peer.rm","args":{"name":"meter"}}"#,
        r#"{"id":5,"version":1,"command":"peer.import","args":{"replace":true,"peers":[{"name":"a","prefix":["10.2.0.1/32"]},{"name":"b","prefix":["10.2.0.2/32"],"deny":true}]}}"#,
        r#"{"id":6,"version":1,"command":"peer.ls"}"#,
        r#"{"id":7,"version":1,"command":"route.add","args":{"name":"r","match":"alarm/*","topic":"alarms/{peer}/{path.1}","qos":1}}"#,
        r#"{"id":8,"version":1,"command":"route.rm","args":{"name":"r"}}"#,
        r#"{"id":9,"version":1,"command":"upstream.ls"}"#,
        r#"{"id":10,"version":1,"command":"config.reload"}"#,
    ] {
        write(&dir, line.as_bytes());
    }
}

fn spool_seeds() {
    let dir = corpus_dir("spool");
    let scratch = m2m_router_tests::unique_temp_path("fuzz-seed-spool", "");
    {
        let spool = Spool::open(&scratch, 1 << 20).unwrap();
        for i in 0..3 {
            spool
                .append(
                    Bytes::from(format!("m2m/meter/{i}")),
                    Bytes::from_static(b"21.5"),
                )
                .unwrap();
        }
    }
    for entry in std::fs::read_dir(&scratch).unwrap().flatten() {
        if entry.path().extension().is_some_and(|x| x == "seg") {
            let segment = std::fs::read(entry.path()).unwrap();
            write(&dir, &segment);
            // A torn last record, as a crash mid-write leaves it.
            write(&dir, &segment[..segment.len() - 5]);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

fn frame_seeds() {
    // Every 300th frame of the differential corpus: each kind of frame is
    // there, without 63,000 files.
    let sample: Vec<Vec<u8>> = frames::corpus().into_iter().step_by(300).collect();
    for target in ["classifier", "xdp"] {
        let dir = corpus_dir(target);
        for frame in &sample {
            write(&dir, frame);
        }
    }
}

fn main() {
    coap_seeds();
    mqtt_seeds();
    bridge_seeds();
    config_seeds();
    control_seeds();
    spool_seeds();
    frame_seeds();
    println!("seeds written to fuzz/corpus/");
}
