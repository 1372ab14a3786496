from diffbank.cli import main

main()
