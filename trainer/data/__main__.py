from trainer.data.cifar10 import main

main()
