"""Diagnosis behind docs/accuracy.md, entry 1: the logistic-regression peers with
scikit-learn at several regularisation strengths, on Marquee's cached token
features (`marquee train --extract-only` first). It rebuilds the fit / tune / val
rows and the cache keys as src/train/{mod,tokens,manifest}.rs do, mean-pools MiniLM-L6
and the 224x336 EfficientNet map, tunes thresholds on the tune films with the same
grid and decision rule, and prints val macro-F1. Val is read to test an explanation,
never to choose a setting.

    target/peer-venv/bin/pip install scikit-learn==1.9.1
    target/peer-venv/bin/python docs/lr_check.py [POSTERS_V1_DIR] [CACHE/tokens]
"""
import json, hashlib, os, struct, sys, numpy as np
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/posters-v1"
cache = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/marquee/tokens")
RECIPE="tokens v1 | effnet-lite0 maps 224x336 160x240 catmullrom | minilm-l6 L3 L6 128"
rows=[json.loads(l) for l in open(root+"/movies.jsonl") if l.strip()]
def fnv(s):
    h=0xcbf29ce484222325
    for b in s.encode(): h=((h^b)*0x100000001b3)&0xffffffffffffffff
    return h
labels=sorted({g for r in rows for g in r["genres"]})
train=[r for r in rows if r["split"]=="train"]; val=[r for r in rows if r["split"]=="val"]
fit=[r for r in train if fnv(r["film"])%10!=0]; tune=[r for r in train if fnv(r["film"])%10==0]
def feats(rs):
    T=[];P=[];H=[]
    for i in range(0,len(rs),128):
        ch=rs[i:i+128]; h=hashlib.sha256(); h.update(RECIPE.encode())
        for r in ch:
            for part in [r["id"].encode(), (root+"/"+r["poster"]).encode(), r["overview"].encode(), (r.get("caption") or "").encode()]:
                h.update(struct.pack("<Q",len(part))); h.update(part)
        d=load_file(f"{cache}/{h.hexdigest()[:32]}.safetensors")
        off=d["text_off"]; l6=d["text_l6"].astype(np.float32).reshape(-1,384); tm=d["teacher_map"].astype(np.float32).reshape(len(ch),-1,1280)
        for j in range(len(ch)):
            a,b=off[j],off[j+1]
            H.append(b>a); T.append(l6[a:b].mean(0) if b>a else np.zeros(384,np.float32)); P.append(tm[j].mean(0))
    return np.array(T),np.array(P),np.array(H)
def Y(rs): return np.array([[g in r["genres"] for g in labels] for r in rs],np.uint8)
Tf,Pf,Hf=feats(fit); Tt,Pt,Ht=feats(tune); Tv,Pv,Hv=feats(val)
yf,yt,yv=Y(fit),Y(tune),Y(val)
def f1(p,y):
    tp=(p&y).sum(0); fp=(p&~y.astype(bool)).sum(0); fn=((~p.astype(bool))&y.astype(bool)).sum(0)
    d=2*tp+fp+fn; return np.where(d>0,2*tp/np.maximum(d,1),0)
def tuneth(s,y):
    out=[]
    for j in range(s.shape[1]):
        best=(0.5,-1)
        for st in range(1,91):
            t=st*0.01+0.04; p=(s[:,j]>=t).astype(np.uint8)
            tp=(p&y[:,j]).sum(); fp=(p&(1-y[:,j])).sum(); fn=((1-p)&y[:,j]).sum()
            f=2*tp/(2*tp+fp+fn) if 2*tp+fp+fn else 0
            if f>best[1]: best=(t,f)
        out.append(best[0])
    return np.array(out,np.float32)
def decide(s,t):
    p=(s>=t).astype(np.uint8)
    for i in range(len(p)):
        if p[i].sum()==0: p[i,np.argmax(s[i]/t)]=1
    return p
def lr(X,y,Xs,C,std):
    if std: sc=StandardScaler().fit(X); X=sc.transform(X); Xs=[sc.transform(x) for x in Xs]
    out=[np.zeros((len(x),y.shape[1])) for x in Xs]
    for j in range(y.shape[1]):
        m=LogisticRegression(C=C,max_iter=100).fit(X,y[:,j])
        for o,x in zip(out,Xs): o[:,j]=m.predict_proba(x)[:,1]
    return out
for name, std, C in [("std C=%g" % c, True, c) for c in (1, 0.1, 0.01, 0.001, 0.0001)] + [("raw C=1", False, 1.0)]:
    st,sv=lr(Tf[Hf],yf[Hf],[Tt[Ht],Tv],C,std)
    pt,pv=lr(Pf,yf,[Pt[Ht],Pv],C,std)
    th=tuneth(st,yt[Ht]); mt=f1(decide(sv,th),yv).mean()
    late_t=(st+pt)/2; thl=tuneth(late_t,yt[Ht]); ml=f1(decide((sv+pv)/2,thl),yv).mean()
    print(name,"text macro %.4f late macro %.4f"%(mt,ml),flush=True)
