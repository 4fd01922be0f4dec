import sys,json
# Prints the graph+insert rows (and the full build) of bench recall JSON lines.
for f in sys.argv[1:]:
    for l in open(f):
        if not l.startswith('{'): continue
        j=json.loads(l); p=j['params']
        if j['method']=='graph' and 'insert' not in f.split('/')[-1] and False: continue
        print(f"{f.split('/')[-1]:<28} {j['method']:<13} L {p['L']:>4} guide {str(p.get('insert_guide')):<6} rec {j['recall_at_k']:.4f} mass {j['mass_recall']:.4f} scored {100*j['scored_fraction']:.2f}% ins_us/key {j.get('insert_us_per_key',0):7.1f} ms/call {j.get('insert_ms_per_call',0):7.2f} (guide {j.get('guide_ms_per_call',0):6.2f})")
