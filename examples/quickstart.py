"""lowbit in one page: float teacher -> ternary student (KD + GSLR) -> packed ONNX -> runtime.

Runs offline in about 10 s on 2 CPU cores with scikit-learn's bundled 8x8 digits.
"""

import lowbit
from lowbit import data, models

train, test = data.digits(), data.digits(train=False)
train, val = data.validation_split(train)  # what epochs report; the test split is for the end

# 1. A float teacher.
teacher, _ = lowbit.train(models.create("digits_cnn", seed=0), train, val,
                          epochs=20, batch_size=64, lr=0.05, progress=False)

# 2. A ternary student (2-bit weights {-1,0,+1}*alpha, 4-bit activations), initialised from
#    the teacher's float weights (Apprentice scheme C), distilled with GSLR (Shin et al.).
student = lowbit.quantize(teacher, weight_bits=2, act_bits=4)
student, record = lowbit.distill(student, teacher, train, val, scheme="C", temperature=4,
                                 lam=0.7, gslr=lowbit.GSLR(start_epoch=2, end_epoch=6),
                                 epochs=6, batch_size=64, progress=False)
print(f"test accuracy: teacher {lowbit.evaluate(teacher, test):.2%}, ternary student "
      f"{lowbit.evaluate(student, test):.2%}")

# 3. Packed ONNX (ternary weights at 1.6 bits), verified in onnxruntime against PyTorch.
result = lowbit.export(student, "digits_ternary.onnx", formats=("onnx",), verify=test, data=train,
                       progress=False)
print(result.layers)  # per layer: weight bits, input bits, the onnxruntime kernel that runs it
print(result.verification["onnx-int"])  # top-1 agreement with PyTorch, integer kernels

# 4. The torch-free runtime takes raw uint8 images.
session = lowbit.Session("digits_ternary.onnx")
print(f"onnxruntime accuracy {session.evaluate((test.images.numpy(), test.labels.numpy())):.2%}")
