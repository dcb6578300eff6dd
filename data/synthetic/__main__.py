"""`python -m data.synthetic`: writes the synthetic set as files (see data.synthetic.writers)."""
from data.synthetic.writers import main

if __name__ == "__main__":
  main()
