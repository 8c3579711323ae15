# CIFAR-infinity on CUDA. The image runs the same ./setup.sh as the README: it installs the system
# libraries ffcv builds against, Python, a virtual environment and the package. torch's wheels carry
# their own CUDA libraries; the base image supplies the driver-facing runtime.
#   docker build -t cifar-infinity .
#   docker run --gpus all --rm -v $PWD/data:/opt/cifar-infinity/data cifar-infinity \
#       python -m trainer.data prepare --out data/cifar10
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /opt/cifar-infinity
COPY . .
RUN ./setup.sh && rm -rf /var/lib/apt/lists/* /root/.cache/pip

ENV PATH=/opt/cifar-infinity/.venv/bin:$PATH
CMD ["python", "-m", "trainer.models"]
