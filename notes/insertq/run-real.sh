#!/bin/sh
# Offline insert measurements on the real code set (see notes/insertq.md). Quiet box please.
B="nice -n 19 ./target/release/kvdex bench recall --data /work/shared/data/smollm2-code-8k --index graph --insert-frac 0.1 --lists 96,128 --json"
O=notes/insertq
# Guides = the inserted positions' own prefill queries (1024 per graph), one insert call.
$B --insert-guide keys > $O/real-own-keys.jsonl
$B --insert-guide exact --insert-queries 1024 > $O/real-own-exact.jsonl
$B --insert-guide approx --insert-queries 1024 > $O/real-own-approx.jsonl
# Daemon-like: batches of 64 keys, ~16 guides per batch.
$B --insert-guide keys --insert-batch 64 > $O/real-own-keys-b64.jsonl
$B --insert-guide approx --insert-queries 208 --insert-batch 64 > $O/real-own-approx-b64.jsonl
# Guides = later (decode) queries: the first 64 test queries per head; all rows measured on
# the other 192.
$B --insert-guide keys --guide-tests 64 > $O/real-later-keys.jsonl
$B --insert-guide exact --guide-tests 64 > $O/real-later-exact.jsonl
$B --insert-guide approx --guide-tests 64 > $O/real-later-approx.jsonl
$B --insert-guide keys --guide-tests 64 --insert-batch 64 > $O/real-later-keys-b64.jsonl
$B --insert-guide approx --guide-tests 64 --insert-batch 64 > $O/real-later-approx-b64.jsonl
# The same with the guides also remembered in the query memory (GraphParams::remember_guides).
$B --insert-guide approx --guide-tests 64 --insert-batch 64 --remember-guides > $O/real-later-approx-b64-remember.jsonl
