import numpy as np, sys
D="/work/shared/data/smollm2-code-8k/"
for L in [3,10,17,24]:
    K=np.load(D+f"K_L{L}.npy").astype(np.float32); Q=np.load(D+f"Q_L{L}.npy").astype(np.float32)
    for kv in range(3):
        keys=K[kv,:7168]; qs=Q[kv*3:(kv+1)*3,7168::16].reshape(-1,64)
        mu=0
        C=keys.T@keys/len(keys)
        w,V=np.linalg.eigh(C); V=V[:,::-1]
        out=[]
        for d in [8,16,32]:
            P=V[:,:d]; kp=keys@P; kperp=np.linalg.norm(keys-kp@P.T,axis=1)
            qp=qs@P; qperp=np.linalg.norm(qs-qp@P.T,axis=1)
            s=qs@keys.T
            b=qp@kp.T+qperp[:,None]*kperp[None,:]
            tau=np.sort(s,axis=1)[:,-256][:,None]
            glob=(b>=tau).mean()
            # visited-like: top 3% by exact score
            thr3=np.sort(s,axis=1)[:,-215][:,None]*0+np.sort(s,axis=1)[:,-int(0.05*7168)][:,None]
            vis=s>=thr3
            frac_vis=((b>=tau)&vis).sum()/vis.sum()
            out.append(f"d{d}: keep_all={glob:.3f} keep_near={frac_vis:.3f}")
        print(L,kv," ".join(out),flush=True)
