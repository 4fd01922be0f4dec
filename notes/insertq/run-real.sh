#!/bin/sh
# Offline insert measurements on the real code set (see notes/insertq.md).
B="nice -n 19 ./target/release/kvdex bench recall --data /work/shared/data/smollm2-code-8k --index graph --insert-frac 0.1 --lists 96,128 --json"
O=notes/insertq
$B --insert-guide exact --insert-queries 1024 > $O/real-own-exact.jsonl
$B --insert-guide approx --insert-queries 1024 > $O/real-own-approx.jsonl
$B --insert-guide approx --insert-queries 208 --insert-batch 64 > $O/real-own-approx-b64.jsonl
$B --insert-guide keys --guide-tests 64 > $O/real-later-keys.jsonl
$B --insert-guide exact --guide-tests 64 > $O/real-later-exact.jsonl
$B --insert-guide approx --guide-tests 64 > $O/real-later-approx.jsonl
$B --insert-guide approx --guide-tests 64 --insert-batch 64 > $O/real-later-approx-b64.jsonl
$B --insert-guide keys --insert-batch 64 > $O/real-keys-b64.jsonl
