#!/bin/bash
# usage: run1m.sh S E [extra...]
S=$1; E=$2; shift 2
./target/release/kvdex bench recall --synth-context 1048576 --synth-train 8192 --kv-heads 1 --index graph --k 64 --lists 256,384,512,768 --entry-sample $S --entry-best $E "$@" > notes/entry/r1m-s${S}e${E}$TAG.txt 2> notes/entry/r1m-s${S}e${E}$TAG.err
