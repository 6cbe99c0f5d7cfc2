from glasslstm.cli import console

console()
