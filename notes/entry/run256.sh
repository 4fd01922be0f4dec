#!/bin/bash
# usage: run256.sh S E [extra...]
S=$1; E=$2; shift 2
./target/release/kvdex bench recall --synth-context 262144 --kv-heads 1 --index graph --k 64 --synth-train 2048 --lists 128,192,256,384,512 --entry-sample $S --entry-best $E "$@" > notes/entry/r256k-s${S}e${E}$TAG.txt 2> notes/entry/r256k-s${S}e${E}$TAG.err
