//! Runs N forwarding decisions on a fixed workload, for instruction counting under callgrind:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/count_forward 10 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/count_forward 10 100000
//! ```
//!
//! The difference of the two totals divided by N is the instructions per forwarding decision
//! (`cargo xtask callgrind` does exactly this). Arguments: subscribers, N.

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("numeric argument"));
    let n_subscribers = args.next().unwrap_or(10);
    let n = args.next().unwrap_or(100_000);
    let (mut shard, src, packet) = benches::room(n_subscribers, 100);
    let mut reply = [0u8; 512];
    let mut total = 0;
    for _ in 0..n {
        total += benches::forward_once(&mut shard, src, std::hint::black_box(&packet), &mut reply);
    }
    assert_eq!(
        total,
        n * n_subscribers,
        "every decision forwards to every subscriber"
    );
    println!("decisions={n} destinations={total}");
}
