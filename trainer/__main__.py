from trainer.training.run import main

main()
