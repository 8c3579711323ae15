"""Submit one training job per architecture (x grid point x seed) to SLURM (or run them here), and watch them.

    python jobs/launch.py --all --profile smoke --local
    python jobs/launch.py --all --cluster slurm/example-cluster.yaml -C time_min=240 optim.lr=0.05
    python jobs/launch.py --arch resnet9_tiny --profile smoke --seeds 2 --local --wait
    python jobs/launch.py --arch resnet,vgg_bn --seeds 3 optim.lr=0.05,0.1 train.ema=0,0.999
    python jobs/launch.py --status SWEEP --wait
    python jobs/launch.py --all --wait --retries 2          # a job that FAILED is submitted again, resuming

The logic lives in the package trainer/launch/ (importable by the jobs themselves); --help lists the options.
"""

from trainer.launch import main

if __name__ == "__main__":
    main()
