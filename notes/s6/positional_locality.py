import numpy as np, json, sys
D='/work/shared/data/smollm2-code-8k'
meta=json.load(open(D+'/meta.json'))
S,W,K=128,512,64
for L in meta['layers']:
    Q=np.load(f'{D}/Q_L{L}.npy').astype(np.float32); Kk=np.load(f'{D}/K_L{L}.npy').astype(np.float32)
    H,T,d=Q.shape; G=Kk.shape[0]; grp=H//G
    res={}
    for h in range(H):
        for t in range(T-64,T,4):
            q=Q[h,t]; k=Kk[h//grp,S:t-W+1]
            s=k@q/np.sqrt(d); p=np.exp(s-s.max()); p/=p.sum()
            order=np.argsort(-s); top=set(order[:K]); topmass=p[order[:K]].sum()
            for seeds in (4,8,16):
                for r in (4,8,16,32):
                    cov=np.zeros(len(s),bool)
                    for i in order[:seeds]:
                        cov[max(0,i-r):i+r+1]=True
                    # best K within covered rows
                    cs=np.where(cov)[0]; best=cs[np.argsort(-s[cs])[:K]]
                    mr=p[best].sum()/topmass
                    res.setdefault((seeds,r),[]).append((mr,cov.sum()))
    print('layer',L,'n',k.shape[0])
    for key,v in sorted(res.items()):
        a=np.array(v); print('  seeds %2d r %2d  mass_recall %.3f  rows %.0f'%(key[0],key[1],a[:,0].mean(),a[:,1].mean()))
