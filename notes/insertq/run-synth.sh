#!/bin/sh
# Offline insert measurements on the decode bench's synthetic data at 64K tokens, one KV head
# (4 query heads), 10% inserted in daemon-like batches of 64 (see notes/insertq.md).
B="nice -n 19 ./target/release/kvdex bench recall --synth-context 65536 --kv-heads 1 --k 64 --index graph --insert-frac 0.1 --lists 128,256 --insert-batch 64 --json --synth-tests 512"
O=notes/insertq
# Guides = later decode queries: the first 400 of 512 test queries per head (~16 per batch,
# the daemon's default); every row measured on the other 112 per head.
$B --guide-tests 400 --insert-guide keys > $O/synth64k-later-keys-b64.jsonl
$B --guide-tests 400 --insert-guide approx > $O/synth64k-later-approx-b64.jsonl
# ~8 guides per batch (200 per head); measured on the other 312 per head.
$B --guide-tests 200 --insert-guide keys > $O/synth64k-later200-keys-b64.jsonl
$B --guide-tests 200 --insert-guide approx > $O/synth64k-later200-approx-b64.jsonl
# The same with the guides also remembered in the query memory (GraphParams::remember_guides).
$B --guide-tests 400 --insert-guide approx --remember-guides > $O/synth64k-later-approx-b64-remember.jsonl
