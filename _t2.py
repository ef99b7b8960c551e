import os; os.environ["TRITON_INTERPRET"]="1"
import torch
from sqz_compile.config import SqueezeConfig
from sqz_compile.squeeze.capture import squeeze_kv
from sqz_compile.squeeze.quantize import RopeTable
from sqz_compile.kernels.quant.reference import dequantize_context
from sqz_compile.kernels.quant.triton import dequantize_layer
torch.manual_seed(0)
for D,bits,out in ((64,4,0.01),(80,3,0.0),(96,2,0.05)):
    layers,H,L,hq=1,2,90,4
    k=torch.randn(layers,H,L,D); v=torch.randn(layers,H,L,D); q=torch.randn(layers,hq,20,D)
    rope=RopeTable(1.0/(10000**(torch.arange(0,D,2).float()/D)), 1.1)
    ctx=squeeze_kv(k.clone(),v.clone(),q,D**-0.5,SqueezeConfig(kv_bits=bits,kv_outliers=out,observation_window=20),rope=rope)
    lc=ctx.layer(0)
    kr,vr=dequantize_context(lc.keys,lc.values,*lc[11:],D)
    kt,vt=dequantize_layer(lc.keys,lc.values,*lc[11:],D)
    print(D,bits,float((kr-kt).abs().max()), float((vr-vt).abs().max()))
