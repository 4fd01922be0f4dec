import numpy as np
D="/work/shared/data/smollm2-code-8k/"
rng=np.random.default_rng(0)
def kmeans(X,k,it=15):
    C=X[rng.choice(len(X),k,replace=False)].copy()
    for _ in range(it):
        d=(X**2).sum(1)[:,None]-2*X@C.T+(C**2).sum(1)[None]
        a=d.argmin(1)
        for j in range(k):
            m=a==j
            if m.any(): C[j]=X[m].mean(0)
    return C,a
res=[]
for L in [3,10,17,24]:
    K=np.load(D+f"K_L{L}.npy").astype(np.float32); Q=np.load(D+f"Q_L{L}.npy").astype(np.float32)
    for kv in range(3):
        keys=K[kv,64:7168]  # excl sinks
        qs=Q[kv*3:(kv+1)*3,7168::8].reshape(-1,64)/8.0
        for nc in [64]:
            C,a=kmeans(keys,nc)
            sizes=np.bincount(a,minlength=nc)
            s=qs@keys.T
            fr=[]
            for i in range(len(qs)):
                top=np.argsort(-s[i])[:64]; w=np.exp(s[i]-s[i].max()); tm=w[top].sum()
                # rank clusters by max-score bound proxy: centroid score + radius term
                cs=qs[i]@C.T
                order=np.argsort(-cs)
                got=0; scanned=0; inset=np.zeros(nc,bool)
                for c in order:
                    inset[c]=True; scanned+=sizes[c]
                    sel=inset[a]
                    cand=np.where(sel)[0]
                    t=cand[np.argsort(-s[i][cand])[:64]]
                    if w[t].sum()>=0.95*tm: break
                fr.append(scanned/len(keys))
            res.append(np.median(fr)); print(L,kv,nc,"median frac scanned",np.median(fr),"p90",np.percentile(fr,90),flush=True)
print("overall median",np.median(res))
